"""`rayalign train` on real Ray Train workers (local Ray, gloo, the tiny model).

Each `TorchTrainer.fit` costs ~15 s here, so the runs are few and shared: one uninterrupted 2-worker run
is the reference that the oracle, the other batch splits (1 worker x 4 micro-batches; 4 x 1 under ZeRO-1) and
DeepSpeed are compared with; a crashed and resumed run with SPA's self-refinement is compared with the oracle
(worker-kill recovery with the default settings: tests/test_train_defaults.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.run_dir import prepare_run_dir
from rayalign.tasks.sentiment import gold_pairs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("in_process_ray")]
METRIC_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(32, seed=11)))
    return path


def _overrides(tiny_model_dir, pairs_file, run_dir, *extra):
    # One reference cache for all runs here: the first run scores the pairs, the others hit the cache.
    cache = Path(pairs_file).parent / "ref_cache"
    return [f"model.policy={tiny_model_dir}", f"data.train_file={pairs_file}", "data.eval_fraction=0.25",
            f"ref.cache_dir={cache}",
            "data.max_completion_length=48", "optim.lr=5e-4", "optim.warmup_ratio=0", "optim.scheduler=constant",
            "train.global_batch_size=8", "train.num_workers=2", "train.gradient_accumulation_steps=2",
            "train.epochs=2", "train.save_every=2", "train.eval_every=3", f"run.dir={run_dir}", *extra]


def train(tiny_model_dir, pairs_file, run_dir, *extra, resume=False) -> int:
    from rayalign.train import run_train

    config = prepare_run_dir(load_config(None, _overrides(tiny_model_dir, pairs_file, run_dir, *extra)))
    return run_train(config, resume=resume)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


# What an HF model directory with its tokenizer may hold (sharded weights: model-0000N-of-0000M.safetensors + index).
FINAL_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
               "added_tokens.json", "vocab.json", "merges.txt", "README.md"}


def assert_final_is_model_and_tokenizer_only(final: Path, last_step: int = 6) -> None:
    """An allow-list: no optimizer or trainer state, no DeepSpeed leftovers (latest, global_step*, zero_to_fp32.py);
    and the stage's end wrote no checkpoint of its `last_step`."""
    names = {p.name for p in final.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= names, names
    assert names <= FINAL_FILES, names - FINAL_FILES
    assert not (final.parent / "checkpoints" / f"step-{last_step}").exists()


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, pairs_file, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert train(tiny_model_dir, pairs_file, run_dir) == 0
    return run_dir


def test_artifacts_metrics_and_checkpoints(uninterrupted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = metrics(uninterrupted)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]  # 24 training pairs / 8 per step x 2 epochs
    for key in METRIC_KEYS:
        assert all(key in m for m in steps), key
    assert "eval/rewards/accuracies" in steps[2] and "eval/rewards/accuracies" not in steps[0]
    assert steps[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference
    assert steps[-1]["rewards/margins"] > steps[0]["rewards/margins"]
    final = json.loads((uninterrupted / "final_metrics.json").read_text())
    assert final["step"] == 6 and 0.0 <= final["eval/rewards/accuracies"] <= 1.0
    assert list((uninterrupted / "tb").glob("events.out.tfevents.*"))
    # save_every=2 and each epoch's end (3 steps) gave steps 2, 3 and 4, the newest 2 kept; the end writes
    # final/ only: the model and tokenizer, no optimizer or trainer state and no step-6 checkpoint
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert json.loads((uninterrupted / "checkpoints" / "step-4" / "trainer_state.json").read_text())["step"] == 4
    assert (uninterrupted / "checkpoints" / "step-4" / "optimizer.pt").is_file()
    assert_final_is_model_and_tokenizer_only(uninterrupted / "final")
    model = AutoModelForCausalLM.from_pretrained(uninterrupted / "final")
    AutoTokenizer.from_pretrained(uninterrupted / "final")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_matches_the_in_process_oracle(uninterrupted, tiny_model_dir):
    """The Ray Train run (2 workers x 2 accumulation) computes what the plain loop computes."""
    import copy

    from rayalign.data import load_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs
    from rayalign.train import split_eval

    config = load_config(uninterrupted / "config.yaml")
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    train_rows, _ = split_eval(load_rows(config.data.train_file).rows, config, tokenizer)
    reference = copy.deepcopy(model).requires_grad_(False)
    history = train_pairs(model, reference, tokenizer, train_rows, config)
    ray_steps = metrics(uninterrupted)
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in ray_steps], abs=1e-5)
    oracle = {k: v.detach() for k, v in model.state_dict().items()}
    for name, value in weights(uninterrupted / "final").items():
        torch.testing.assert_close(value, oracle[name], atol=2e-5, rtol=0, msg=name)


def test_one_worker_with_the_reference_in_the_step_equals_two_with_the_cache(
        uninterrupted, tiny_model_dir, pairs_file, tmp_path, capsys, monkeypatch):
    """1 worker x 4 accumulation == 2 x 2, with `ref.cache=false` (the reference forward inside each step: same
    numbers, no cache written), run from another directory with relative paths: the workers run elsewhere and
    must still find them. (One run for both: each `TorchTrainer.fit` costs ~15 s of fixed start-up here.)"""
    import os

    monkeypatch.chdir(tmp_path)
    model = os.path.relpath(tiny_model_dir, tmp_path)
    assert train(model, pairs_file, "run", "ref.cache=false", "train.num_workers=1",
                 "train.gradient_accumulation_steps=4") == 0
    run_dir = tmp_path / "run"
    assert "reference cache" not in capsys.readouterr().out
    assert [m["loss"] for m in metrics(run_dir)] == pytest.approx([m["loss"] for m in metrics(uninterrupted)],
                                                                   abs=1e-5)
    assert_same_weights(run_dir / "final", uninterrupted / "final", atol=2e-5)


# ZeRO-3 (with everything offloaded, and a restart) is compared with DDP in the next test. ZeRO-1 runs on 4 workers
# x 1 micro-batch, the 2-worker DDP reference's global batch split another way (one fit for both checks).
@pytest.mark.parametrize("settings", [
    ("train.zero_stage=1", "train.num_workers=4", "train.gradient_accumulation_steps=1", "train.cpus_per_worker=0.5"),
    ("train.zero_stage=2", "train.offload_optimizer=true")], ids=["zero1-4-workers", "zero2-offload-optimizer"])
def test_deepspeed_zero_matches_ddp(uninterrupted, tiny_model_dir, pairs_file, tmp_path, settings):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    assert train(tiny_model_dir, pairs_file, run_dir, "train.engine=deepspeed", *settings) == 0
    ds, ddp = metrics(run_dir), metrics(uninterrupted)
    assert [m["loss"] for m in ds] == pytest.approx([m["loss"] for m in ddp], abs=1e-4)
    assert [m["grad_norm"] for m in ds] == pytest.approx([m["grad_norm"] for m in ddp], rel=1e-3)
    AutoModelForCausalLM.from_pretrained(run_dir / "final")  # ZeRO-3 shards consolidated into a normal HF dir
    assert_same_weights(run_dir / "final", uninterrupted / "final", atol=1e-4)
    assert_final_is_model_and_tokenizer_only(run_dir / "final")
    checkpoint = run_dir / "checkpoints" / "step-4"  # one copy of DeepSpeed's state, beside the consolidated model
    assert (checkpoint / "deepspeed").is_dir() and (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / "optimizer.pt").exists()


def test_zero3_offloading_everything_restarts_after_a_worker_died_and_equals_ddp(
        uninterrupted, tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    """ZeRO-3 with parameters and optimizer state offloaded to the CPU and gradient checkpointing on (as the 8B
    config runs): rank 1 is SIGKILLed before step 5, Ray
    Train restarts the group from checkpoints/step-4 (DeepSpeed's offloaded state reloaded), and the run
    ends where the uninterrupted DDP run ends, its shards consolidated into a plain HF model in final/."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    monkeypatch.setenv("RAYALIGN_KILL_WORKER_AT", "5:1")
    assert train(tiny_model_dir, pairs_file, run_dir, "train.engine=deepspeed", "train.zero_stage=3",
                 "train.offload_params=true", "train.offload_optimizer=true", "train.max_failures=1",
                 "train.gradient_checkpointing=true") == 0
    assert (run_dir / ".killed-step5-rank1").exists()
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(run_dir)] == pytest.approx([m["loss"] for m in metrics(uninterrupted)],
                                                                   abs=1e-4)
    AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert_same_weights(run_dir / "final", uninterrupted / "final", atol=1e-4)
    assert_final_is_model_and_tokenizer_only(run_dir / "final")
    checkpoint = run_dir / "checkpoints" / "step-4"  # one copy of DeepSpeed's state, beside the consolidated model
    assert (checkpoint / "deepspeed").is_dir() and (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / "optimizer.pt").exists()


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tiny_model_dir, pairs_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    # lr 1e30: AdamW's first update moves every weight by ~1e30, so the next forward overflows.
    assert train(tiny_model_dir, pairs_file, run_dir, "optim.lr=1e30", "train.save_every=1") == 1
    assert "non-finite training metrics" in capsys.readouterr().err
    failure = json.loads((run_dir / "FAILED.json").read_text())
    good = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))
    assert good == [f"step-{failure['step'] - 1}"]
    AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / good[0])
    assert not (run_dir / "final").exists()


HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH.exists(), reason=f"the shared HH file is not present at {HH}")
def test_readme_training_contract_on_hh(tmp_path):
    """`rayalign train configs/hh_tiny.yaml` as the README shows it, cut to 12 steps for CI."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    assert "rayalign train configs/hh_tiny.yaml" in (repo / "README.md").read_text()
    run_dir = tmp_path / "hh"
    result = subprocess.run([sys.executable, "-m", "rayalign.cli", "train", "configs/hh_tiny.yaml",
                             f"run.dir={run_dir}", "train.max_steps=12", "train.eval_every=6",
                             "train.save_every=6"],  # the config's 40 is past the cut: one checkpoint at 6
                            cwd=repo, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pairs: train 2081, eval 231; 0 dropped" in result.stdout
    steps = metrics(run_dir)
    assert len(steps) == 12 and "eval/rewards/accuracies" in steps[5]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert 0.0 < final["eval/rewards/accuracies"] < 1.0
    for name in ("metrics.jsonl", "tb", "checkpoints/step-6", "final"):
        assert (run_dir / name).exists(), name


def test_gdpo_trains_on_ray_workers(tiny_model_dir, tmp_path):
    """GDPO's extra columns (belief length, level ids, target) survive Parquet and the worker path."""
    from tests.test_gdpo_training import gdpo_rows

    data = tmp_path / "gdpo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gdpo_rows(12)))
    run_dir = tmp_path / "run"
    assert train(tiny_model_dir, data, run_dir, "loss.type=gdpo", "train.num_workers=1",
                 "train.gradient_accumulation_steps=1", "train.epochs=1", "train.global_batch_size=3",
                 "data.eval_fraction=0.25") == 0
    steps = metrics(run_dir)
    assert len(steps) == 3 and all(m["loss"] > 0 for m in steps)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert "eval/loss" in final and 0.0 < final["eval/gdpo/js_gap"] < 0.833  # the alignment gap, in [0, sqrt ln 2]


def test_spa_self_refinement_crashed_and_resumed_on_ray_workers(tiny_model_dir, pairs_file, tmp_path, monkeypatch,
                                                                 capsys):
    """Rank 0 is SIGKILLed before step 5 with `train.max_failures=0`: the run ends with exit 1 and says how to
    go on, keeps its newest 2 checkpoints, and refuses a rerun without --resume. Resumed from step-4, with SPA's
    soft labels (active from step 3, once the margin window is full and the warm start is over) and the
    window restored from the checkpoint, it computes what the in-process oracle computes, step for step."""
    run_dir, spa = tmp_path / "run", ("spa.refine=true", "spa.window=8", "spa.k_fraction=0.25",
                                      "spa.warm_start=0.3", "spa.iteration=2")
    monkeypatch.setenv("RAYALIGN_KILL_WORKER_AT", "5:0")  # no restarts allowed: the run fails
    assert train(tiny_model_dir, pairs_file, run_dir, *spa, "train.max_failures=0") == 1
    assert "rerun the same command with --resume" in capsys.readouterr().err
    # save_every=2 and the end of epoch 1 (3 steps an epoch) wrote steps 2, 3 and 4; the newest 2 are kept
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-3", "step-4"]
    assert not (run_dir / "final").exists()
    state = json.loads((run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert len(state["spa_window"]["values"]) == 8
    with pytest.raises(ConfigError, match="already has checkpoints .* pass --resume"):
        train(tiny_model_dir, pairs_file, run_dir, *spa)
    assert train(tiny_model_dir, pairs_file, run_dir, *spa, resume=True) == 0  # the drill fired once already
    out = capsys.readouterr().out
    assert "reference cache hit" in out and "resuming from" in out
    steps = metrics(run_dir)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[0]["spa/threshold"] == 0.0 and steps[0]["spa/active"] == 0  # window empty, warm start
    assert all(s["spa/active"] == 1 for s in steps[2:])  # 30% of 6 steps -> active from step 3
    assert sum(s["spa/relabelled"] for s in steps[2:]) > 0
    assert all(s["spa/relabelled"] == 0 for s in steps[:2])
    # the in-process oracle refines the same way (it used to ignore spa.refine), without interruption
    import copy

    from rayalign.data import load_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs
    from rayalign.train import split_eval

    config = load_config(run_dir / "config.yaml")
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    train_rows, _ = split_eval(load_rows(config.data.train_file).rows, config, tokenizer)
    history = train_pairs(model, copy.deepcopy(model).requires_grad_(False), tokenizer, train_rows, config)
    for key in ("loss", "spa/relabelled", "spa/threshold", "spa/active"):
        assert [h[key] for h in history] == pytest.approx([m[key] for m in steps], abs=1e-5), key
    oracle = {k: v.detach() for k, v in model.state_dict().items()}
    for name, value in weights(run_dir / "final").items():
        torch.testing.assert_close(value, oracle[name], atol=2e-5, rtol=0, msg=name)
