"""`jobs/`: rayalign's entry points as Ray jobs, checked without Ray (`--dry-run`).

The command line, the refusals made before anything is uploaded, and jobs/requirements.txt against
pyproject.toml. A job on a real head with the job API (submitted, stopped with `ray job stop`, resubmitted
with `--resume`) runs on the autoscaling node types in tests/test_cluster_jobs.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tomllib

from tests.conftest import REPO

SUBMIT = str(REPO / "jobs" / "submit.sh")


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
