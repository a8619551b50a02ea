"""`rayalign run --resume` after a real kill: SIGKILL to the driver's whole process group mid-generation.

The reference is the session's uninterrupted reduced quickstart (`quickstart_run` in conftest); this test
adds one run with the same configuration, killed while iteration 2's Generator actors are up, then
resumed. To save CI time the run starts from a copy of the reference's setup, iteration 0 and iteration 1
with iteration 0's record (a legal resume point: what a run killed before iteration 2's pass leaves), so
it computes iteration 2 and the evaluations of pi_1 and pi_2 itself. With the HF backend (per-prompt
seeds) and one Ray Train worker every stage is deterministic, so the resumed run must end with the
reference's weights and metrics, and must not touch iteration 1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, own_ray_env
from tests.conftest import wait_for as _wait_for

pytestmark = pytest.mark.slow
TAG = "RAYALIGN_TEST_RUN_TAG"  # inherited by the driver's Ray daemons and workers: finds leaked processes
KEPT = ("sft/model.safetensors", "eval/sft.parquet", "iter-0/train/final/model.safetensors", "eval/iter-0.parquet",
        "iter-1/samples.parquet", "iter-1/judged.parquet", "iter-1/judge_counts.json",
        "iter-1/train/final/model.safetensors", "iter-1/train/metrics.jsonl", "iter-1/seconds")
SEEDED = ("data", "tiny-model", "sft", "eval/sft.parquet", "iter-0", "eval/iter-0.parquet", "iter-1",
          "timings/pass-sft.json", "timings/pass-iter-0.json")  # the passes that ran before iteration 2's


def _tagged_processes(tag: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries TAG=tag (what `ps e` shows)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if f"{TAG}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found



def _kill_run_in_iteration_2_generation(command: list[str], env: dict, tag: str) -> str:
    """Start the run in its own session, SIGKILL its process group once iteration 2's generator actor is up (the
    quickstart's generate.persistent host, started at the resumed run's first pass; else a Ray Data actor)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    lines: list[str] = []
    # A thread reads the pipe: a blocking readline could not time out.
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        _wait_for(lambda: any("iteration 2: generating" in line for line in lines) or proc.poll() is not None,
                  900, "the log line of iteration 2's generation")
        assert proc.poll() is None, "".join(lines)[-4000:]
        _wait_for(lambda: any("SamplerHost" in c or "MapBatches(Generator)" in c
                              for c in _tagged_processes(tag).values()), 120, "iteration 2's generator actor")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "".join(lines)


def _reap(tag: str) -> dict[int, str]:
    """Ray's daemons die with their driver (parent-death signal); give them a moment, then kill survivors."""
    try:
        _wait_for(lambda: not _tagged_processes(tag), 30, "Ray processes to exit")
        return {}
    except AssertionError:
        survivors = _tagged_processes(tag)
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _wait_for(lambda: not _tagged_processes(tag), 30, "killed Ray processes to exit")
        return survivors


def _stamp(run_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per kept artifact: an atomic rewrite changes the inode, an in-place one the mtime."""
    return {name: ((s := (run_dir / name).stat()).st_ino, s.st_mtime_ns) for name in KEPT}


def _records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # wall times differ, of course: compare which stages were timed, not how long they took
    return [{k: (v if k != "seconds" and not k.startswith("time/") else "timed") for k, v in r.items()}
            for r in records]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _copy_up_to_iteration_1(source: Path, target: Path) -> None:
    """The run dir as a run killed before iteration 2's pass leaves it: iteration 0's record is written
    in iteration 1's pass, iteration 1's only after iteration 2's."""
    for name in SEEDED:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (source / name).is_dir() else shutil.copy2)(source / name, target / name)
    records = [line for line in (source / "metrics.jsonl").read_text().splitlines()
               if json.loads(line)["iteration"] == 0]
    (target / "metrics.jsonl").write_text("".join(f"{line}\n" for line in records))


def _nested(value):
    """Parquet's (nested) arrays of token ids as plain lists of ints."""
    return [_nested(v) for v in value] if hasattr(value, "__iter__") else int(value)


def test_resume_after_kill_in_iteration_2_generation(quickstart_run, tmp_path):
    reference = quickstart_run
    assert reference.result.returncode == 0, reference.result.stdout[-3000:] + reference.result.stderr[-3000:]
    run_dir, tag = tmp_path / "run", uuid.uuid4().hex
    _copy_up_to_iteration_1(reference.run_dir, run_dir)
    command = [sys.executable, "-m", "rayalign.cli", "run", "configs/quickstart.yaml", f"run.dir={run_dir}",
               *reference.overrides]
    env = own_ray_env(HF_HUB_OFFLINE="1", **{TAG: tag})  # a Ray of its own: its daemons carry the tag

    first_log = _kill_run_in_iteration_2_generation([*command, "--resume"], env, tag)
    survivors = _reap(tag)
    assert not _tagged_processes(tag)
    assert "iteration 1: found iter-1/judge_counts.json" in first_log, first_log[-3000:]
    assert "iteration 1: generating" not in first_log, first_log[-3000:]
    # Killed inside iteration 2's Ray Data pass: nothing of it, nor of pi_1's evaluation, was written.
    assert not (run_dir / "iter-2" / "judge_counts.json").exists()
    assert not (run_dir / "iter-2" / "samples.parquet").exists()
    assert not (run_dir / "eval" / "iter-1.parquet").exists()
    before = _stamp(run_dir)

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, cwd=REPO, env=env,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    log = resumed.stdout
    assert "setup: pi_SFT found" in log and "iteration 0: training found" in log, log
    assert "iteration 1: found iter-1/judge_counts.json" in log and "iteration 1: training found" in log, log
    assert "iteration 1: generating" not in log and "iteration 2: generating" in log, log
    # the resumed run's generator and judge start from pi_1's files, then get pi_2's weights pushed in memory
    for kind in ("generator", "judge"):
        assert f"{kind}: 1 engine(s) started for the run; 0 weight load(s) from files" in log, log
    assert _stamp(run_dir) == before, "a finished stage was rewritten by --resume"
    assert not _reap(tag), "Ray processes outlived a normally finished run"

    # The interrupted + resumed run equals the uninterrupted one: its samples, per-iteration metrics, final weights.
    import pandas as pd

    for name in ("iter-2/samples.parquet", "eval/iter-2.parquet"):
        ours, theirs = pd.read_parquet(run_dir / name), pd.read_parquet(reference.run_dir / name)
        assert _nested(ours["token_ids"]) == _nested(theirs["token_ids"]), name
    ours, theirs = _records(run_dir), _records(reference.run_dir)
    assert [r.keys() for r in ours] == [r.keys() for r in theirs]
    for mine, other in zip(ours, theirs):
        assert mine == {k: pytest.approx(v, abs=1e-6) if isinstance(v, float) else v for k, v in other.items()}
    ours, theirs = _weights(run_dir / "iter-2/train/final"), _weights(reference.run_dir / "iter-2/train/final")
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst <= 1e-6, worst
    print(f"resume: max |weight difference| {worst:.2e}; Ray processes left after the kill: {len(survivors)}")
