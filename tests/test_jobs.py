"""`jobs/`: rayalign's entry points as Ray jobs, on a real `ray start --head` with its dashboard.

The command line is checked without Ray (`--dry-run`). The cluster test runs ONE seed-only micro quickstart
loop (SEED_ONLY_LOOP) as a job, stops it with `ray job stop` once iteration 0's training is complete (its
`final/` marker), checks the job is STOPPED and none of its processes survive, resubmits with `--resume`
through jobs/ and checks it SUCCEEDS without redoing finished stages (logged as skipped; their files keep
inode and mtime).
The head runs in its own short temp dir on free loopback ports, with a marker in its environment that
every process it starts inherits; teardown kills exactly those processes (never `ray stop`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, SEED_ONLY_LOOP
from tests.conftest import wait_for as _wait_for
from tests.ray_heads import kill_marked, marked_processes, start_head

SUBMIT = str(REPO / "jobs" / "submit.sh")
MARKER = "RAYALIGN_TEST_JOBS"  # in the head's environment: inherited by every process of that cluster
JOB_MARKER = "RAYALIGN_TEST_JOB"  # in the first job's runtime env (--env): that job's processes only
# Job processes that are Ray's, not rayalign's, and outlive a stopped job by design: the supervisor (and its
# watcher shell) until the job manager reaps it, the detached singletons Ray Data starts once per cluster, and
# Ray Train's detached PlacementGroupCleaner (0 CPUs). They carry the first job's env too.
RAY_OWN = ("ray::JobSupervisor", "ray::_StatsActor", "ray::ActorLocationTracker", "ray::_AutoscalingCoordinatorActor",
           "ray::PlacementGroupCleaner", "sleep 1", "/bin/sh -c while kill -s 0")
FINISHED = ("data/seed_pairs.jsonl", "sft/model.safetensors", "eval/sft.parquet",
            "iter-0/train/final/model.safetensors", "iter-0/train/metrics.jsonl")


def _dry_run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([SUBMIT, *args, "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "VIRTUAL_ENV": sys.prefix, **(env or {})})


def test_submit_command_line():
    result = _dry_run("run", "configs/quickstart.yaml", "run.dir=/shared/runs/q1", "loop.iterations=1", "--resume",
                      "--env", "EXTRA=1", env={"HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "http://10.0.0.1:8265"})
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert argv[1:3] == ["job", "submit"] and argv[argv.index("--address") + 1] == "http://10.0.0.1:8265"
    assert argv[argv.index("--submission-id") + 1] == "rayalign-run-q1"
    assert argv[argv.index("--") + 1:] == ["python", "-m", "rayalign.cli", "run", "configs/quickstart.yaml",
                                           "run.dir=/shared/runs/q1", "loop.iterations=1", "--resume"]
    spec = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert spec["working_dir"] == str(REPO) and {"/.git/", "/.venv/", "/runs/", "*.parquet"} <= set(spec["excludes"])
    assert spec["env_vars"] == {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                                "EXTRA": "1"}
    assert json.loads(argv[argv.index("--metadata-json") + 1])["rayalign_run"] == "/shared/runs/q1"


def test_submit_refusals_and_storage_runs(capsys):
    """In-process (one Ray import for all): what must fail before anything is uploaded, and a storage run."""
    spec = importlib.util.spec_from_file_location("jobs_submit", REPO / "jobs" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    # The run must outlive the job's temporary working dir; the config must travel with it.
    for args, message in ((("run", "configs/quickstart.yaml", "run.dir=runs/x"), "is relative"),
                          (("run", "configs/quickstart.yaml"), "set run.dir="),
                          (("run", "configs/quickstart.yaml", "run.dir=/a", "lose.beta=1"), "did you mean loss.beta"),
                          (("train", "/etc/hostname", "run.dir=/a"), "outside this checkout")):
        assert submit.main([*args, "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    assert submit.main(["tune", "configs/tune_mallows.yaml", "run.storage=s3://b/runs/sweep-1/", "--dry-run",
                        "--pip", "jobs/requirements.txt"]) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[argv.index("--submission-id") + 1] == "rayalign-tune-sweep-1"
    assert json.loads(argv[argv.index("--runtime-env-json") + 1])["pip"]["packages"][0].startswith("torch")


def test_requirements_file_is_the_projects_dependencies_without_ray():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (REPO / "jobs" / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == \
        [d for d in dependencies if not d.startswith("ray")]


def _work_processes(tag: str) -> dict[int, str]:
    """The first job's own processes: its driver and the workers of its tasks and actors."""
    return {pid: c for pid, c in marked_processes(JOB_MARKER, tag).items() if not c.startswith(RAY_OWN)}


def _tear_down(temp_dir: Path, tag: str) -> None:
    survivors = kill_marked(MARKER, tag)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not survivors, f"processes of the test's Ray head survived: {survivors}"



def _job_report(client, job_id: str) -> str:
    status, log = client.get_job_status(job_id).value, client.get_job_logs(job_id)
    return f"job {job_id} is {status}; its log ends:\n{log[-6000:]}"


def _inode_and_mtime(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {name: ((run_dir / name).stat().st_ino, (run_dir / name).stat().st_mtime_ns) for name in FINISHED}


@pytest.mark.slow
def test_job_stopped_after_iteration_0_resumes_without_redoing_it(tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    tag, temp_dir = secrets.token_hex(4), Path(f"/tmp/ra-jb-{secrets.token_hex(2)}")  # sockets need short paths
    temp_dir.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # Auth off for head and clients alike (a token in ~/.ray would otherwise switch modes); the venv first on
    # PATH when the head starts, because job entrypoints run that PATH's `python`.
    env.update({"RAY_AUTH_MODE": "disabled", MARKER: tag, "PATH": f"{venv_bin}:{os.environ['PATH']}",
                "VIRTUAL_ENV": sys.prefix})
    run_dir, started = tmp_path / "quick", time.perf_counter()
    try:
        _, address = start_head(temp_dir, env, MARKER, object_store_mb=300)
        for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_API_SERVER_ADDRESS", address)):
            monkeypatch.setenv(key, value)  # this process's job client: Ray's env vars beat its address argument
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        client = _wait_for(lambda: _client(JobSubmissionClient, address), 60, "the dashboard's job API")
        job = [SUBMIT, "run", "configs/quickstart.yaml", f"run.dir={run_dir}", *SEED_ONLY_LOOP, "--address", address]
        first = subprocess.run([*job, "--no-wait", "--env", f"{JOB_MARKER}={tag}"], env=env, cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        job_id = "rayalign-run-quick"
        _wait_for(lambda: (run_dir / "iter-0/train/final").is_dir() or client.get_job_status(job_id).is_terminal(),
                  900, "iteration 0's training to finish", lambda: _job_report(client, job_id))
        assert client.get_job_status(job_id) == JobStatus.RUNNING, _job_report(client, job_id)
        stopped_after, running = time.perf_counter() - started, _work_processes(tag)  # all must go
        stop = subprocess.run([str(Path(venv_bin) / "ray"), "job", "stop", job_id, "--address", address], env=env,
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and client.get_job_status(job_id) == JobStatus.STOPPED, stop.stdout + stop.stderr
        assert any("rayalign.cli run" in c for c in running.values()), f"not the job's processes: {running}"
        _wait_for(lambda: not _work_processes(tag), 60, f"the stopped job's processes to exit: {_work_processes(tag)}")
        _wait_for(lambda: not _live_placement_groups(), 60, "the stopped job's placement groups to be removed")
        kept = _inode_and_mtime(run_dir)
        unresumed = subprocess.run(job, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert unresumed.returncode == 2 and "pass --resume" in unresumed.stderr, unresumed.stderr
        resumed = subprocess.run([*job, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + "\n" + _job_report(client, f"{job_id}-r2")
        assert client.get_job_status(f"{job_id}-r2") == JobStatus.SUCCEEDED
        log = client.get_job_logs(f"{job_id}-r2")
        for skipped in ("setup: pi_SFT found", "evaluation of sft: found eval/sft.parquet, skipped",
                        "iteration 0: training found in"):
            assert skipped in log, f"{skipped!r} not in the resumed job's log:\n{log[-4000:]}"
        assert _inode_and_mtime(run_dir) == kept, "a finished stage was redone"
        assert (run_dir / "report.md").is_file() and (run_dir / "eval/iter-0.parquet").is_file()
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["iteration"] for m in metrics] == [0] and all("win_rate_vs_sft" in m for m in metrics)
        print(f"jobs: stop + --resume of the micro loop in {time.perf_counter() - started:.0f} s; stopped at "
              f"{stopped_after:.0f} s: {sorted(set(c.split(' ')[0] for c in running.values()))}")
    finally:
        _tear_down(temp_dir, tag)


def _live_placement_groups() -> list:
    """Placement groups not REMOVED (Ray Train's workers hold theirs): via the state API at RAY_API_SERVER_ADDRESS."""
    from ray.util.state import list_placement_groups

    return [pg for pg in list_placement_groups(raise_on_missing_output=False) if pg.state != "REMOVED"]


def _client(cls, address: str):
    try:
        client = cls(address)
        client.list_jobs()
        return client
    except Exception:  # the dashboard's job module starts a little after `ray start` returns
        return None
