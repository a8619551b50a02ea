"""The training engines refuse to apply a step whose gradient norm is inf or nan.

A hook on one weight turns its gradient into inf/nan (the loss stays finite): `step()` must report the
non-finite norm (the trainer stops the run on it, like a non-finite loss) and leave the weights, the
optimizer state and the schedule untouched; a later finite step is applied normally. DDP runs in this
process; DeepSpeed (ZeRO 1-3 on gloo, one rank) in a subprocess, so that its process group and global
state stay out of the rest of the suite; there the engine's checkpoint also round-trips through our
weights_only reader (DeepSpeed's own unpickles fully), a crafted optimizer file is refused, and DeepSpeed's
shared-memory all-reduce kernel (inference only) is not JIT-compiled.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rayalign.config import Config, OptimConfig, TrainConfig
from tests.conftest import REPO


def _config(**train) -> Config:
    return Config(optim=OptimConfig(lr=0.1, warmup_ratio=0.0, scheduler="constant"),
                  train=TrainConfig(global_batch_size=2, **train))


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_ddp_engine_does_not_step_on_a_non_finite_gradient(bad):
    from rayalign.engine import DDPEngine

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    engine = DDPEngine(model, _config(), total_steps=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.weight.register_hook(lambda grad: torch.full_like(grad, bad))
    engine.backward(model(torch.ones(3, 4)).sum())
    assert not math.isfinite(engine.step())
    hook.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(engine.optimizer.state) == 0 and engine.scheduler.last_epoch == 0
    assert all(p.grad is None for p in model.parameters())  # the bad gradient is not carried into the next step

    engine.backward(model(torch.ones(3, 4)).sum())
    assert math.isfinite(engine.step())
    assert not torch.equal(model.weight, before["weight"]) and engine.scheduler.last_epoch == 1


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import math, os, sys
    import torch
    import deepspeed
    from rayalign.config import Config, OptimConfig, TrainConfig
    from pathlib import Path
    from rayalign.checkpoint import UnsafeCheckpointError
    from rayalign.engine import DeepSpeedEngine

    class Payload:
        def __reduce__(self):
            return os.system, ("touch pwned",)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        config = Config(optim=OptimConfig(lr=0.1, warmup_ratio=0.0, scheduler="constant"),
                        train=TrainConfig(global_batch_size=2, engine="deepspeed", zero_stage=stage))
        engine = DeepSpeedEngine(model, config, total_steps=4)

        def weights():
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                return [p.detach().clone() for p in model.parameters()]

        before = weights()
        hook = model.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
        engine.backward(engine.module(torch.ones(2, 4)).sum())
        norm = engine.step()
        hook.remove()
        assert not math.isfinite(norm), (stage, norm)
        assert all(torch.equal(a, b) for a, b in zip(weights(), before)), f"stage {stage}: bad step applied"
        engine.backward(engine.module(torch.ones(2, 4)).sum())
        assert math.isfinite(engine.step()), stage
        assert not torch.equal(weights()[0], before[0]), f"stage {stage}: the finite step was not applied"

        # Its checkpoint loads through our weights_only reader, exactly; a crafted file is refused.
        directory = Path(f"stage{stage}")
        directory.mkdir()
        engine.save(directory, rank=0)
        torch.manual_seed(1)
        other = torch.nn.Linear(4, 2)
        resumed = DeepSpeedEngine(other, config, total_steps=4)
        resumed.load(directory)
        for e in (engine, resumed):
            e.backward(e.module(torch.full((2, 4), 0.5)).sum())
            e.step()
        with deepspeed.zero.GatheredParameters(list(other.parameters())):
            assert all(torch.equal(a, b.detach()) for a, b in zip(weights(), other.parameters())), stage
        optim = next(directory.rglob("*optim_states.pt"))
        torch.save({"optimizer_state_dict": Payload()}, optim)
        try:
            resumed.load(directory)
            raise AssertionError(f"stage {stage}: a crafted {optim.name} was loaded")
        except UnsafeCheckpointError:
            pass
        assert not os.path.exists("pwned"), stage
    print("ok")
""")


@pytest.mark.slow
def test_deepspeed_engine_non_finite_gradient_and_safe_checkpoint_loading(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, str(port)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=600)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), output
    # the shared-memory all-reduce kernel serves DeepSpeed's inference only: not JIT-built (~30 s) for training
    assert "deepspeed_shm_comm" not in output, output
