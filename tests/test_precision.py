"""Devices and precision: bf16 training keeps float32 master weights; each inference stage has its own dtype.

- `train.precision=bf16` (autocast over float32 weights, the DDP path; the oracle runs the same step) tracks
  the float32 run's loss over 20 steps on the tiny model within 0.02 nats per step (stated tolerance: bf16
  matmuls keep ~3 significant digits, and 20 steps of lr 5e-4 let the two runs drift apart a little).
- At lr 5e-7 one AdamW step moves the float32 master weights, while the same step on pure bf16 weights
  rounds away (a bf16 weight of size 0.02 has a spacing of ~1e-4, 200x the update).
- `model.dtype`, the old single dtype, reads as generate.dtype, judge.dtype and ref.dtype; "auto" is bf16
  on a GPU and float32 on the CPU; a stage given GPUs in a process that sees none is an error.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.devices import inference_dtype, stage_device, training_autocast
from rayalign.tasks.sentiment import gold_pairs

STEPS = 20


def _train(tiny_model_dir, precision: str, *overrides) -> tuple[list[float], dict]:
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    config = load_config(None, [f"model.policy={tiny_model_dir}", "optim.lr=5e-4", "optim.warmup_ratio=0",
                                "optim.scheduler=constant", "train.global_batch_size=4", f"train.max_steps={STEPS}",
                                "train.epochs=2", "data.max_completion_length=32", f"train.precision={precision}",
                                *overrides])
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    reference = copy.deepcopy(model).requires_grad_(False)
    history = train_pairs(model, reference, tokenizer, gold_pairs(2 * STEPS, seed=5), config)
    return [h["loss"] for h in history], {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bf16_autocast_tracks_the_fp32_loss_over_20_steps(tiny_model_dir):
    fp32, fp32_weights = _train(tiny_model_dir, "fp32")
    bf16, bf16_weights = _train(tiny_model_dir, "bf16")
    assert len(fp32) == len(bf16) == STEPS
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    assert max(gaps) < 0.02, gaps
    assert fp32[-1] < fp32[0] - 0.05 and bf16[-1] < bf16[0] - 0.05  # both learn, not merely agree
    assert fp32[:3] != bf16[:3]  # the bf16 run really computed in bf16
    assert all(w.dtype == torch.float32 for w in bf16_weights.values())  # master weights stay float32


def _one_step_changed_fraction(model) -> float:
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0)
    ids = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    with training_autocast(load_config(None, ["train.precision=bf16"]).train, "cpu"):
        logits = model(input_ids=ids, use_cache=False).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()).backward()
    optimizer.step()
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(model.parameters(), before))
    return changed / sum(b.numel() for b in before)


def test_master_weights_move_at_lr_5e_7_where_pure_bf16_weights_do_not(tiny_model_dir):
    from rayalign.models import load_model

    master = _one_step_changed_fraction(load_model(str(tiny_model_dir)).train())
    pure_bf16 = _one_step_changed_fraction(load_model(str(tiny_model_dir), dtype="bfloat16").train())
    assert master > 0.5, master
    assert pure_bf16 < 0.01 * master, (pure_bf16, master)


def test_inference_dtype_auto_is_bf16_on_gpu_and_fp32_on_cpu():
    assert inference_dtype("auto", 0.0) == "float32"
    assert inference_dtype("auto", 0.25) == "bfloat16"
    assert inference_dtype("float32", 1.0) == "float32"
    with pytest.raises(ValueError, match="dtype"):
        inference_dtype("float16", 0.0)


def test_old_model_dtype_reads_as_every_inference_stage(capsys):
    config = load_config(None, ["model.dtype=bfloat16"])
    assert (config.generate.dtype, config.judge.dtype, config.ref.dtype) == ("bfloat16",) * 3
    assert config.train.precision == "fp32"  # training precision is its own setting
    assert "model.dtype is deprecated" in capsys.readouterr().err


def test_stage_device_is_cpu_without_gpus_and_refuses_gpus_it_cannot_see():
    assert stage_device(0.0).type == "cpu"
    if torch.cuda.is_available():
        assert stage_device(0.5, "ref").type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="ref was given 0.5 GPU"):
            stage_device(0.5, "ref")
