"""Learning-rate schedules: hand-computed factors."""

from __future__ import annotations

import math

import pytest
import torch

from rayalign.config import OptimConfig
from rayalign.optim import build_optimizer, build_scheduler, lr_factor, warmup_steps


def test_warmup_then_decay_values():
    """Warm-up 2 of 10 steps: factors 1/3, 2/3, then cosine 0.5(1+cos(pi k/8)) for k = 0..7."""
    got = [lr_factor(s, total_steps=10, warmup=2, scheduler="cosine") for s in range(10)]
    want = [1 / 3, 2 / 3] + [0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert got == pytest.approx(want)
    assert [lr_factor(s, total_steps=10, warmup=2, scheduler="linear") for s in (2, 6)] == pytest.approx([1.0, 0.5])
    assert lr_factor(9, total_steps=10, warmup=0, scheduler="constant") == 1.0


def test_warmup_ratio_or_steps():
    assert warmup_steps(OptimConfig(warmup_ratio=0.1), 25) == 3
    assert warmup_steps(OptimConfig(warmup_ratio=0.0, warmup_steps=150), 25) == 150


@pytest.mark.parametrize("name", ["adamw", "rmsprop"])
def test_optimizers_step(name):
    weight = torch.nn.Parameter(torch.ones(3))
    config = OptimConfig(name=name, lr=0.1, warmup_ratio=0.0, scheduler="constant")
    optimizer = build_optimizer([weight], config)
    scheduler = build_scheduler(optimizer, config, total_steps=5)
    (weight ** 2).sum().backward()
    optimizer.step()
    scheduler.step()
    assert torch.all(weight < 1.0)
    assert type(optimizer).__name__.lower() == name
