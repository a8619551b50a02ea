"""LoRA (`model.lora`, `rayalign.lora`) in one process, on the tiny model: the worker's own pieces (adapters,
the base-as-reference, the step, the DDP engine, adapter checkpoints, the merge) against independent
references. The Ray Train runs (DDP, DeepSpeed ZeRO-2 with a restart) are in tests/test_lora_ray.py.
"""

from __future__ import annotations

import pytest
import torch

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.data_kind import PAIRS
from rayalign.encode import collate
from rayalign.engine import DDPEngine
from rayalign.lora import ADAPTER_FILES, BaseReference, add_adapters, check_target_modules, save_adapters, save_merged
from rayalign.models import load_model, load_tokenizer
from rayalign.oracle import encode_pairs
from rayalign.step import micro_batch_loss, sequence_scores
from rayalign.tasks.sentiment import gold_pairs

LORA = ("model.lora=true", "model.lora_rank=4", "model.lora_alpha=8", "ref.cache=false", "optim.lr=1e-2",
        "optim.warmup_ratio=0", "optim.scheduler=constant", "train.global_batch_size=4",
        "data.max_completion_length=24")


def _setup(tiny_model_dir, *extra, n=4):
    config = load_config(None, [*LORA, *extra])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    encoded = encode_pairs(gold_pairs(n, seed=5), tokenizer, config).items
    return config, encoded, collate(encoded, PAIRS, pad_token_id=tokenizer.pad_token_id)


def _policy(tiny_model_dir, config, checkpoint=None):
    """What the worker trains: the base model with the config's adapters (`Worker._load_policy`)."""
    return add_adapters(load_model(str(tiny_model_dir)), config.model, seed=config.train.seed,
                        checkpoint=checkpoint).train()


def _train(policy, engine, batch, config, steps: int) -> list[float]:
    """The worker's step on one micro-batch (ref.cache=false: the reference runs inside it)."""
    losses = []
    for _ in range(steps):
        out = micro_batch_loss(engine.module, batch, config, reference=BaseReference(policy))
        engine.backward(out.losses.mean())
        engine.step()
        losses.append(float(out.losses.detach().mean()))
    return losses


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def test_only_the_adapters_train_and_disabled_adapters_are_the_base_model(tiny_model_dir):
    config, _, batch = _setup(tiny_model_dir)
    base = load_model(str(tiny_model_dir))
    policy = _policy(tiny_model_dir, config)
    initial = {name: p.detach().clone() for name, p in policy.named_parameters()}
    losses = _train(policy, DDPEngine(policy, config, total_steps=3), batch, config, steps=3)
    assert losses[0] == pytest.approx(0.693147, abs=1e-6)  # B = 0 at init: the policy is the reference
    assert losses[-1] < losses[0] - 0.01
    base_weights = dict(base.named_parameters())
    adapters = 0
    for name, p in policy.named_parameters():
        if "lora_" in name:  # every adapter moved (A from step 2 on, once B is no longer 0)
            adapters += 1
            assert p.requires_grad and not torch.equal(p, initial[name]), name
        else:  # every base weight is bitwise what it was, and what the model on disk holds
            assert not p.requires_grad and torch.equal(p, initial[name]), name
            assert torch.equal(p, base_weights[_base_name(name)]), name
    assert adapters == 2 * 7 * base.config.num_hidden_layers  # A and B on q k v o gate up down
    # With the adapters disabled, the policy is the base model to 1e-6 (and with them, it is not)
    reference = BaseReference(policy)
    ref, on_disk, trained = (sequence_scores(m, batch) for m in (reference, base.eval(), policy))
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(ref, side), getattr(on_disk, side), atol=1e-6, rtol=0)
        assert (getattr(trained, side) - getattr(ref, side)).abs().max() > 1e-2
    assert policy.training and not ref.chosen.requires_grad  # train mode restored, no graph kept


def _sequence_logps(model, item: dict, side: str) -> torch.Tensor:
    """Sum of log p(completion token | all before), one unpadded sequence at a time: no masks, no batching."""
    prompt, completion = item["prompt_ids"], item[f"{side}_ids"]
    ids = torch.tensor([prompt + completion])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt) - 1:].sum()


def test_dpo_loss_and_gradients_equal_a_hand_built_peft_model(tiny_model_dir):
    """The step's DPO loss and adapter gradients equal PEFT's own model driven by hand: a `PeftModel` from
    `get_peft_model` and `LoraConfig` built here, a separately loaded base model as the reference, per-sequence
    log-probs computed one unpadded sequence at a time and `rayalign.core.losses.dpo_loss`. In float64, so
    that padding and batching leave no rounding difference to allow for."""
    from peft import LoraConfig, get_peft_model

    from rayalign.core.losses import dpo_loss

    config, encoded, batch = _setup(tiny_model_dir, "model.lora_target_modules=[q_proj,v_proj,down_proj]")
    policy = _policy(tiny_model_dir, config).double()
    torch.manual_seed(config.train.seed)
    hand = get_peft_model(load_model(str(tiny_model_dir)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")).train()
    hand.double()
    assert policy.state_dict().keys() == hand.state_dict().keys()
    for name, value in hand.state_dict().items():  # the same adapters from the same seed
        assert torch.equal(value, policy.state_dict()[name]), name
    generator = torch.Generator().manual_seed(1)  # B != 0, so that A's gradient is not 0 too
    with torch.no_grad():
        for (name, p), (_, q) in zip(policy.named_parameters(), hand.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                q.copy_(p)

    out = micro_batch_loss(policy, batch, config, reference=BaseReference(policy))
    out.losses.mean().backward()

    reference = load_model(str(tiny_model_dir)).double()
    sides = ("chosen", "rejected")
    with torch.no_grad():
        ref = [torch.stack([_sequence_logps(reference, item, side) for item in encoded]) for side in sides]
    logps = [torch.stack([_sequence_logps(hand, item, side) for item in encoded]) for side in sides]
    expected = dpo_loss(*logps, *ref, beta=config.loss.beta).losses
    expected.mean().backward()
    torch.testing.assert_close(out.losses, expected, atol=1e-9, rtol=0)
    assert (out.losses - 0.693147).abs().max() > 1e-3  # the adapters matter to this loss
    grads = {name: p.grad for name, p in hand.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 3 * reference.config.num_hidden_layers
    for name, p in policy.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            torch.testing.assert_close(p.grad, grads[name], atol=1e-10, rtol=1e-7, msg=name)
        else:
            assert p.grad is None, name


def test_resume_from_an_adapter_checkpoint_equals_uninterrupted(tiny_model_dir, tmp_path):
    """2 steps, a checkpoint (adapters + optimizer, as the worker writes it), a fresh process's policy and
    engine loaded from it, 2 more steps == 4 steps in one go; the checkpoint holds no base weights."""
    config, _, batch = _setup(tiny_model_dir)
    straight = _policy(tiny_model_dir, config)
    engine = DDPEngine(straight, config, total_steps=4)
    expected = _train(straight, engine, batch, config, steps=4)

    first = _policy(tiny_model_dir, config)
    engine = DDPEngine(first, config, total_steps=4)
    losses = _train(first, engine, batch, config, steps=2)
    save_adapters(first, tmp_path, first.state_dict())
    engine.save(tmp_path, rank=0)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / ADAPTER_FILES[0])
    assert saved and all("lora_" in key for key in saved)
    resumed = _policy(tiny_model_dir, config, checkpoint=tmp_path)
    engine = DDPEngine(resumed, config, total_steps=4)
    engine.load(tmp_path)
    losses += _train(resumed, engine, batch, config, steps=2)
    # Equal weights give equal log-prob sums but can differ in the last bits per pair: a freshly loaded
    # policy's parameters sit elsewhere in memory than the trained one's, and the packed row's GEMMs round
    # accordingly (measured: 2.7e-7 on a loss of 0.45; bit-equal when padded).
    assert losses == pytest.approx(expected, abs=1e-6)
    # Adam divides by sqrt(v): where v is tiny those last-bit gradient differences become weight differences
    # (measured on an AVX-512 machine: 2.2e-6 at lr 1e-2), while a lost optimizer state moves them by ~3e-2.
    for (name, a), b in zip(resumed.named_parameters(), straight.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)


def test_merged_model_is_a_plain_hf_model_that_generates(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config, _, batch = _setup(tiny_model_dir)
    policy = _policy(tiny_model_dir, config)
    _train(policy, DDPEngine(policy, config, total_steps=2), batch, config, steps=2)
    trained = sequence_scores(policy.eval(), batch)
    save_merged(policy, tmp_path / "final")
    assert not any((tmp_path / "final" / name).exists() for name in ADAPTER_FILES)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
    scores = sequence_scores(merged, batch)
    torch.testing.assert_close(scores.chosen, trained.chosen, atol=1e-4, rtol=0)
    tokenizer = load_tokenizer(str(tiny_model_dir), padding_side="left")
    prompt = tokenizer(["\n\nHuman: How was the movie?\n\nAssistant:"], return_tensors="pt")
    out = merged.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]


def test_lora_config_errors_name_the_key(tiny_model_dir):
    config = load_config(None, ["model.lora=true", "model.lora_target_modules=[q_proj,qq_proj]"])
    with pytest.raises(ConfigError, match=r"^model.lora_target_modules: no module of .* matches qq_proj; "
                                          r"its linear layers are down_proj, gate_proj, .*q_proj"):
        check_target_modules(str(tiny_model_dir), config.model)
    check_target_modules(str(tiny_model_dir), load_config(None, ["model.lora=true"]).model)  # all-linear
    cases = {"model.lora_rank=0": "model.lora_rank: must be > 0",
             "model.lora_dropout=1": r"model.lora_dropout: must be in \[0, 1\)",
             "model.lora_target_modules=[all-linear,q_proj]": "model.lora_target_modules: all-linear already",
             "model.lora_target_modules=[]": "model.lora_target_modules: must name at least one module"}
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.lora=true", override])
    with pytest.raises(ConfigError, match="train.zero_stage: 3 .* does not combine with model.lora"):
        load_config(None, ["model.lora=true", "train.engine=deepspeed", "train.zero_stage=3"])


def test_unmatched_target_modules_stop_train_before_ray_starts(tiny_model_dir, tmp_path):
    """`rayalign train` ends in one config-error line (exit 2) before Ray or any worker starts."""
    import json

    import ray

    from rayalign.errors import EXIT_USAGE, report
    from rayalign.run_dir import prepare_run_dir
    from rayalign.train import run_train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(4, seed=1)))
    config = prepare_run_dir(load_config(None, [f"model.policy={tiny_model_dir}", f"data.train_file={data}",
                                                "model.lora=true", "model.lora_target_modules=[q_proj,v_prj]",
                                                f"run.dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError) as caught:
        run_train(config)
    line, code = report(caught.value, "train")
    assert code == EXIT_USAGE and "\n" not in line
    assert line.startswith("rayalign: config error: model.lora_target_modules: no module of") and "v_prj" in line
    assert not ray.is_initialized() and not (tmp_path / "run" / "checkpoints").exists()
