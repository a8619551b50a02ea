"""LoRA on real Ray Train workers (local Ray, gloo, the tiny model, 1 worker; ~20 s a run).

One DDP run is compared with the in-process oracle training a PEFT model built by hand (same seed, same
adapters): the same losses, the same merged `final/`. A DeepSpeed ZeRO-2 run loses its worker before step
3; Ray Train restarts it from the step-2 checkpoint (adapters only), and it ends where the DDP run ends.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.lora import ADAPTER_FILES
from rayalign.run_dir import prepare_run_dir
from rayalign.tasks.sentiment import gold_pairs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_ray")]
TARGETS = ("q_proj", "v_proj", "up_proj")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(16, seed=11)))
    return path


def train(tiny_model_dir, pairs_file, run_dir, *extra) -> int:
    from rayalign.train import run_train

    overrides = [f"model.policy={tiny_model_dir}", f"data.train_file={pairs_file}", "model.lora=true",
                 "model.lora_rank=4", "model.lora_alpha=8", f"model.lora_target_modules=[{','.join(TARGETS)}]",
                 "data.max_completion_length=32", "optim.lr=5e-3", "optim.warmup_ratio=0",
                 "optim.scheduler=constant", "train.global_batch_size=4", "train.num_workers=1",
                 "train.save_every=2", "train.max_failures=1", f"ref.cache_dir={Path(pairs_file).parent / 'ref'}",
                 f"run.dir={run_dir}", *extra]
    return run_train(prepare_run_dir(load_config(None, overrides)))


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, pairs_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "ddp"
    assert train(tiny_model_dir, pairs_file, run_dir) == 0
    return run_dir


def test_ddp_lora_equals_the_oracle_on_a_hand_built_peft_model(ddp_run, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from rayalign.data import load_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    config = load_config(ddp_run / "config.yaml")
    torch.manual_seed(config.train.seed)
    policy = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=8, target_modules=list(TARGETS), task_type="CAUSAL_LM"))
    history = train_pairs(policy, load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)),
                          load_rows(config.data.train_file).rows, config)
    assert losses(ddp_run) == pytest.approx([h["loss"] for h in history], abs=1e-5)
    assert losses(ddp_run)[0] == pytest.approx(0.693147, abs=1e-6)  # B = 0 at init: policy == reference
    assert len(set(losses(ddp_run))) == 4  # it trains (that the numbers are right: the oracle)

    # checkpoints hold the adapters (and the optimizer), final/ the merged plain model
    checkpoint = ddp_run / "checkpoints" / "step-2"  # save_every=2; the end writes final/ only
    assert {*ADAPTER_FILES, "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert not (checkpoint / "model.safetensors").exists()
    merged = {k: v.detach() for k, v in policy.merge_and_unload().state_dict().items()}
    final, base = weights(ddp_run / "final"), weights(tiny_model_dir)
    assert final.keys() == base.keys() == merged.keys()
    for name, value in final.items():
        torch.testing.assert_close(value, merged[name], atol=2e-5, rtol=0, msg=name)
        if not name.endswith(tuple(f"{t}.weight" for t in TARGETS)):  # what LoRA does not touch stays the base's
            assert torch.equal(value, base[name]), name
        else:
            assert not torch.equal(value, base[name]), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ddp_run / "final")
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_deepspeed_zero2_lora_restarted_after_a_worker_died_equals_ddp(ddp_run, tiny_model_dir, pairs_file,
                                                                        tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("RAYALIGN_KILL_WORKER_AT", "3:0")  # SIGKILL the worker before step 3; Ray restarts it
    assert train(tiny_model_dir, pairs_file, run_dir, "train.engine=deepspeed", "train.zero_stage=2") == 0
    assert (run_dir / ".killed-step3-rank0").exists()
    assert losses(run_dir) == pytest.approx(losses(ddp_run), abs=1e-5)
    final, expected = weights(run_dir / "final"), weights(ddp_run / "final")
    for name, value in final.items():
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=0, msg=name)
    # DeepSpeed's checkpoint holds the adapters' module state only, not a copy of the frozen base
    module_state = next((run_dir / "checkpoints" / "step-2" / "deepspeed").rglob("*model_states.pt"))
    assert module_state.stat().st_size < (tiny_model_dir / "model.safetensors").stat().st_size / 4
