"""The README's resume and recovery promises hold with the DEFAULT checkpoint and failure settings.

No `train.save_every`, `train.save_every_minutes`, `train.keep_checkpoints` or `train.max_failures` is set
here. One tiny `rayalign train` (2 workers, 4 steps an epoch, 4 epochs) loses a worker before step 6: Ray
Train restarts the group (default `max_failures`) from the end-of-epoch-1 checkpoint. Then the whole command
is SIGKILLed (its process group, Ray's daemons included) while a worker hangs before step 9, after the
end-of-epoch-2 checkpoint, and `--resume` continues from that one. The result equals the in-process
oracle's, step for step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch

from rayalign.config_loader import load_config
from tests.conftest import REPO, own_ray_env, wait_for
from tests.test_loop_resume import TAG, _reap, _tagged_processes

pytestmark = pytest.mark.slow


def _command(tiny_model_dir: Path, data: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "rayalign.cli", "train", f"model.policy={tiny_model_dir}", f"data.train_file={data}",
            "data.max_completion_length=48", "optim.lr=5e-4", "optim.warmup_ratio=0", "optim.scheduler=constant",
            "train.global_batch_size=8", "train.num_workers=2", "train.epochs=4", f"run.dir={run_dir}"]


def _run_until(command: list[str], env: dict, done, what: str) -> str:
    """Start `command` in its own session; SIGKILL its process group once `done()` holds; its output."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        wait_for(lambda: done() or proc.poll() is not None, 900, what, lambda: "".join(lines)[-4000:], poll=0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "".join(lines)


def test_killed_train_resumes_from_the_default_epoch_end_checkpoint(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from rayalign.tasks.sentiment import gold_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(32, seed=11)))
    run_dir, tag = tmp_path / "run", uuid.uuid4().hex
    env = own_ray_env(HF_HUB_OFFLINE="1", RAYALIGN_KILL_WORKER_AT="6:1,9:0:stall", **{TAG: tag})  # tagged own Ray
    checkpoints = run_dir / "checkpoints"
    first = _run_until(_command(tiny_model_dir, data, run_dir), env,
                       lambda: (run_dir / ".stalled-step9-rank0").exists(), "rank 0 to hang before step 9")
    _reap(tag)
    assert not _tagged_processes(tag)
    assert (run_dir / ".stalled-step9-rank0").exists(), first[-4000:]
    assert (run_dir / ".killed-step6-rank1").exists()  # that worker died at step 6; Ray restarted the group
    assert not (run_dir / "final").exists()
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step-")) == ["step-4", "step-8"]

    env.pop("RAYALIGN_KILL_WORKER_AT")
    resumed = subprocess.run([*_command(tiny_model_dir, data, run_dir), "--resume"], capture_output=True,
                             text=True, cwd=REPO, env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert f"resuming from {checkpoints / 'step-8'}" in resumed.stdout
    _reap(tag)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == list(range(1, 17))

    # Both interruptions were exact: the same losses and weights as the plain in-process loop.
    import copy

    from rayalign.data import load_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs
    from rayalign.train import split_eval

    config = load_config(run_dir / "config.yaml")
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    train_rows, _ = split_eval(load_rows(str(data)).rows, config, tokenizer)
    history = train_pairs(model, copy.deepcopy(model).requires_grad_(False), tokenizer, train_rows, config)
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in steps], abs=1e-5)
    oracle = {k: v.detach() for k, v in model.state_dict().items()}
    for name, value in load_file(run_dir / "final" / "model.safetensors").items():
        torch.testing.assert_close(value, oracle[name], atol=2e-5, rtol=0, msg=name)
