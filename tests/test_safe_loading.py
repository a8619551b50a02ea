"""Checkpoint `.pt` files are read with `torch.load(weights_only=True)`: a crafted pickle is refused.

`optimizer.pt` (DDP engine) and `sams.pt` (SamS selector) can come from shared storage; a full unpickle
would run any code the file names. The payload here would create a marker file when unpickled: it must be
refused with a message naming the file, and the marker must not appear. The files rayalign writes still
load exactly (DeepSpeed's own files: tests/test_engine.py; resumed runs: test_train_ray, test_sams_training).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rayalign.checkpoint import UnsafeCheckpointError
from rayalign.config import Config, OptimConfig, SamsConfig, TrainConfig


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _engine():
    from rayalign.engine import DDPEngine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return model, DDPEngine(model, Config(optim=OptimConfig(lr=0.1, warmup_ratio=0.0)), total_steps=5)


def test_optimizer_state_round_trips(tmp_path):
    model, engine = _engine()
    engine.backward(model(torch.ones(3, 4)).sum())
    engine.step()
    engine.save(tmp_path, rank=0)
    _, fresh = _engine()
    fresh.load(tmp_path)
    saved, loaded = engine.optimizer.state_dict(), fresh.optimizer.state_dict()
    for key in saved["state"][0]:
        assert torch.equal(torch.as_tensor(saved["state"][0][key]), torch.as_tensor(loaded["state"][0][key]))
    assert fresh.scheduler.state_dict() == engine.scheduler.state_dict()


def test_a_crafted_optimizer_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "scheduler": {}}, tmp_path / "optimizer.pt")
    _, engine = _engine()
    with pytest.raises(UnsafeCheckpointError, match=rf"{tmp_path / 'optimizer.pt'}: refused to load"):
        engine.load(tmp_path)
    assert not marker.exists()


def _selector(kind: str):
    from rayalign.sams_select import PairSelector

    config = Config(sams=SamsConfig(enabled=True, selector=kind, warmup_fraction=0.0),
                    train=TrainConfig(global_batch_size=8))
    return PairSelector(config, num_layers=2, hidden_size=8, total_steps=10, rank=0)


def _round(selector, seed: int) -> torch.Tensor:
    data = torch.Generator().manual_seed(seed)
    n = 8
    return selector._choose(torch.rand(n, generator=data).double(), torch.randn(n, generator=data).double(),
                            -torch.rand(n, generator=data).double(), torch.randn(n, 2, 8, generator=data))


@pytest.mark.parametrize("kind", ["bandit", "random"])
def test_sams_state_round_trips_and_continues_the_same_rounds(tmp_path, kind):
    torch.manual_seed(0)
    selector = _selector(kind)
    for seed in range(3):
        _round(selector, seed)
    selector.save(tmp_path)
    torch.manual_seed(0)
    resumed = _selector(kind)
    resumed.load(tmp_path)
    for seed in range(3, 6):  # the resumed selector makes the uninterrupted one's choices
        assert torch.equal(_round(resumed, seed), _round(selector, seed))


def test_a_crafted_sams_file_is_refused(tmp_path):
    from rayalign.sams_select import STATE_FILE

    marker = tmp_path / "pwned"
    torch.save({"kind": "bandit", "generator": Payload(marker), "scheduler": None}, tmp_path / STATE_FILE)
    with pytest.raises(UnsafeCheckpointError, match=rf"{tmp_path / STATE_FILE}: refused to load"):
        _selector("bandit").load(tmp_path)
    assert not marker.exists()
