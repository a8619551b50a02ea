#!/usr/bin/env python3
"""Submit `rayalign run|train|tune` to a Ray cluster as a Ray job: a thin layer over `ray job submit`.

    jobs/submit.sh run configs/quickstart.yaml run.dir=/shared/runs/x [--resume] [--no-wait]

What it adds to a plain `ray job submit`, and nothing else (see jobs/README.md):
- the config is resolved here, so a typo fails on your machine rather than minutes later on the cluster;
- the run must outlive the job: `run.dir` absolute (a path on the driver node or a shared mount) or
  `run.storage` set, because a job runs in a temporary copy of the working dir;
- a submission id derived from the run's name (`rayalign-run-x`, then `rayalign-run-x-r2` for the first
  resubmission, ...), and a refusal to start a second job on a run while one is active, or a new job on a
  run that already had one without `--resume`;
- a runtime env: this checkout as working dir (minus .git, .venv, runs/, caches, data and model files),
  TOKENIZERS_PARALLELISM=false, the HF offline switches passed through, `--env`, and `--pip` requirements.
It prints the `ray job submit` command it runs. It does not stop, list or tail jobs: `ray job stop|status|logs ID`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the dashboard of a local head, or `ray dashboard cluster.yaml`'s tunnel
COMMANDS = ("run", "train", "tune")
# gitwildmatch patterns relative to the checkout. Ray also honours .gitignore (unless
# RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1) and .rayignore; these hold whatever the user's environment says.
EXCLUDES = ["/.git/", "/.venv/", "/venv/", "/runs/", "/build/", "/dist/", "__pycache__/", "*.pyc", "*.egg-info/",
            ".pytest_cache/", ".ruff_cache/", ".mypy_cache/", ".ci-test.log",
            "*.parquet", "*.arrow", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.zip", "*.tar.gz"]
# Passed through from the submitting shell when set there; nothing else is, so no secret leaks into the
# job's runtime env (which the dashboard shows) unless named with --env.
PASSTHROUGH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
FIXED_ENV = {"TOKENIZERS_PARALLELISM": "false",  # tokenizers' thread pool and Ray's forked workers deadlock
             "PYTHONUNBUFFERED": "1"}  # `ray job logs` shows progress as it happens


class SubmitError(Exception):
    """A problem to report in one line, before anything reaches the cluster."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/submit.sh", description="Submit a rayalign command as a Ray job "
                                "(`ray job submit` with a runtime env and a submission id named after the run).")
    p.add_argument("command", choices=COMMANDS, help="the rayalign entry point to run on the cluster")
    p.add_argument("args", nargs="*", metavar="CONFIG|key=value",
                   help="what `rayalign COMMAND` takes: a YAML in this checkout, then dotted overrides")
    p.add_argument("--resume", action="store_true", help="pass --resume: continue the run, skipping finished work")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of tailing the logs")
    p.add_argument("--address", default=None, help="dashboard address; default $RAY_API_SERVER_ADDRESS, "
                   f"else $RAY_ADDRESS, else {DEFAULT_ADDRESS}")
    p.add_argument("--submission-id", default=None, help="override the id derived from the run's name")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="set an env var in the job (KEY alone: this shell's value); repeatable")
    p.add_argument("--pip", default=None, metavar="REQUIREMENTS",
                   help="install these requirements in the job's runtime env (e.g. jobs/requirements.txt); "
                   "only for clusters whose nodes lack the project")
    p.add_argument("--entrypoint-num-cpus", type=float, default=None,
                   help="CPUs reserved for the driver (default none: it runs on the head, see jobs/README.md)")
    p.add_argument("--entrypoint-num-gpus", type=float, default=None)
    p.add_argument("--entrypoint-resources", default=None, metavar="JSON", help="custom resources for the driver")
    p.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command and exit")
    return p


def split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(config, overrides), as `rayalign` reads them: the first argument without '=' is the config."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def job_config_path(config: str | None) -> str | None:
    """The config's path inside the uploaded working dir (the checkout), which is where the job reads it."""
    if config is None:
        return None
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise SubmitError(f"config {config} does not exist")
    try:
        relative = path.relative_to(REPO)
    except ValueError:
        raise SubmitError(f"config {config} is outside this checkout ({REPO}), so it would not travel with the "
                          "job: copy it into configs/") from None
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to `excludes`

    if PathSpec.from_lines("gitwildmatch", EXCLUDES).match_file(str(relative)):
        raise SubmitError(f"config {config} is in a path the job's working dir leaves out: copy it into configs/")
    return relative.as_posix()


def run_location(config: str | None, overrides: list[str]) -> tuple[str, str]:
    """(where the run lives, its name): run.storage if set, else run.dir, which must then be absolute."""
    sys.path.insert(0, str(REPO))
    from rayalign.config_loader import load_config

    run = load_config(config, overrides).run  # raises ConfigError with rayalign's own message
    if run.storage:
        location = run.storage
    elif not run.dir:
        raise SubmitError("set run.dir=/absolute/path (on the driver node or a shared mount) or run.storage=URI: "
                          "the default runs/<timestamp> would be created inside the job's temporary working dir")
    elif not (run.dir.startswith("/") or run.dir.startswith("~")):
        raise SubmitError(f"run.dir={run.dir} is relative: the job runs in a temporary copy of this checkout, "
                          "where the run would vanish; give an absolute path or set run.storage")
    else:
        location = run.dir
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", location.rstrip("/").rsplit("/", 1)[-1]).strip("-")
    return location, name or "run"


def job_env(items: list[str]) -> dict[str, str]:
    env = {key: os.environ[key] for key in PASSTHROUGH if key in os.environ}
    env.update(FIXED_ENV)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            if key not in os.environ:
                raise SubmitError(f"--env {key}: not set in this shell (use --env {key}=VALUE)")
            value = os.environ[key]
        env[key] = value
    return env


def runtime_env(env: dict[str, str], pip: str | None) -> dict:
    spec = {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env}
    if pip:
        path = Path(pip)
        if not path.is_file():
            raise SubmitError(f"--pip {pip}: no such requirements file")
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        # pip_check off: the cluster's own packages (Ray among them) need not satisfy pip's resolver.
        spec["pip"] = {"packages": [line for line in lines if line], "pip_check": False}
    return spec


def resolve_address(address: str | None) -> str:
    """Ray's clients let RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, override an explicit address; the
    caller exports the result as RAY_API_SERVER_ADDRESS so that `--address` really wins."""
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def check_run_is_free(jobs: list, location: str, resume: bool) -> None:
    """Refuse a second job on a run while one is active, and a new job on a used run without --resume."""
    ours = [j for j in jobs if (j.metadata or {}).get("rayalign_run") == location]
    active = [j for j in ours if not j.status.is_terminal()]
    if active:
        raise SubmitError(f"job {active[0].submission_id} of this run is {active[0].status.value}: two jobs must "
                          f"not write one run; stop it first: ray job stop {active[0].submission_id}")
    if ours and not resume:
        raise SubmitError(f"run {location} already had job(s) {', '.join(j.submission_id for j in ours)}: pass "
                          "--resume to continue it, or choose a new run.dir")


def next_submission_id(jobs: list, base: str) -> str:
    """`base` for a run's first job, then `base-r2`, `base-r3`, ...: Ray never reuses a submission id."""
    taken = {j.submission_id for j in jobs}
    n = 2
    candidate = base
    while candidate in taken:
        candidate, n = f"{base}-r{n}", n + 1
    return candidate


def submit_command(args: argparse.Namespace, address: str, submission_id: str, spec: dict, metadata: dict,
                   entrypoint: list[str]) -> list[str]:
    ray_cli = Path(sys.executable).parent / "ray"  # the ray of this Python, not whatever PATH finds first
    command = [str(ray_cli) if ray_cli.exists() else "ray", "job", "submit", "--address", address,
               "--submission-id", submission_id, "--runtime-env-json", json.dumps(spec),
               "--metadata-json", json.dumps(metadata)]
    for flag in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_resources"):
        if getattr(args, flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.no_wait:
        command.append("--no-wait")
    return [*command, "--", *entrypoint]


def prepare(args: argparse.Namespace) -> tuple[list[str], str, str]:
    """(the `ray job submit` command, the submission id, the address)."""
    config, overrides = split_args(args.args)
    relative_config = job_config_path(config)
    location, name = run_location(config, overrides)
    address = resolve_address(args.address)
    base = args.submission_id or f"rayalign-{args.command}-{name}"
    submission_id = base if args.dry_run else _submission_id(address, base, location, args)
    # `python -m` from the working dir: the job runs the uploaded source, not whatever rayalign a node has.
    entrypoint = ["python", "-m", "rayalign.cli", args.command, *([relative_config] if relative_config else []),
                  *overrides, *(["--resume"] if args.resume else [])]
    metadata = {"rayalign_command": args.command, "rayalign_run": location}
    spec = runtime_env(job_env(args.env), args.pip)
    return submit_command(args, address, submission_id, spec, metadata, entrypoint), submission_id, address


def _submission_id(address: str, base: str, location: str, args: argparse.Namespace) -> str:
    from ray.job_submission import JobSubmissionClient

    os.environ["RAY_API_SERVER_ADDRESS"] = address
    jobs = JobSubmissionClient(address).list_jobs()
    check_run_is_free(jobs, location, args.resume)
    return args.submission_id or next_submission_id(jobs, base)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        command, submission_id, address = prepare(args)
    except SubmitError as exc:
        print(f"jobs/submit.py: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # rayalign's ConfigError; no cluster, or one that wants a token, at the address
        if type(exc).__name__ not in ("ConfigError", "AuthenticationError") and not isinstance(exc, ConnectionError):
            raise
        print(f"jobs/submit.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"jobs/submit.py: submitting {submission_id}:\n  {shlex.join(command)}", flush=True)
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": address}
    try:
        code = subprocess.run(command, env=env).returncode
    except KeyboardInterrupt:
        print(f"\njobs/submit.py: stopped tailing; the job keeps running (ray job stop {submission_id})")
        return 130
    if code == 0 and not args.no_wait:  # `ray job submit` exits 1 on FAILED only; STOPPED is not success either
        from ray.job_submission import JobStatus, JobSubmissionClient

        status = JobSubmissionClient(address).get_job_status(submission_id)
        code = 0 if status == JobStatus.SUCCEEDED else 1
        print(f"jobs/submit.py: job {submission_id} {status.value}")
    return code


if __name__ == "__main__":
    sys.exit(main())
