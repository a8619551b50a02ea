"""cluster.yaml's node types under rayalign's Ray jobs: one loop submitted, stopped, resumed, scaled up and down.

The user's path on a cluster (`ray up cluster.yaml`, then `jobs/submit.sh`) on one machine: the node types of
cluster.yaml are mapped onto Ray's `fake_multinode` provider (the real autoscaler, worker "nodes" as local
raylets) behind a head that has none of the stages' resources and runs the dashboard's job API. ONE
seed-only micro loop (SEED_ONLY_LOOP with configs/cluster_quickstart.yaml) is submitted with `--no-wait`,
stopped with `ray job stop` once iteration 0's training is complete (its `final/`), checked STOPPED with
none of its driver or worker processes left and no placement group alive, refused without `--resume`,
resubmitted with `--resume` (tailing) and checked SUCCEEDED without redoing finished stages (logged as
skipped; their files keep inode and mtime). Over both jobs both worker types must have been launched, on
loopback, and after the run the cluster must shrink back to the head within the idle timeout.

Ray safety (other Ray clusters run on this machine): the head gets its own short temp dir, explicit free
ports and a marker variable in its environment; teardown kills exactly the processes carrying it or the
temp dir (never `ray stop`, never `AutoscalingCluster.start()`, which runs `ray stop --force`) and asserts
none survive. Nothing here reaches AWS.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SEED_ONLY_LOOP, own_ray_env
from tests.conftest import wait_for as _wait_for
from tests.ray_heads import free_port, marked_processes, start_head
from tests.test_cluster import CLUSTER

SUBMIT = str(REPO / "jobs" / "submit.sh")
MARKER = "RAYALIGN_TEST_CLUSTER"  # in the fake head's environment, inherited by every process it starts
JOB_MARKER = "RAYALIGN_TEST_JOB"  # in the first job's runtime env (--env): that job's processes only
# Job processes that are Ray's, not rayalign's, and outlive a stopped job by design: the supervisor (and its
# watcher shell) until the job manager reaps it, the detached singletons Ray Data starts once per cluster, and
# Ray Train's detached PlacementGroupCleaner (0 CPUs). They carry the first job's env too.
RAY_OWN = ("ray::JobSupervisor", "ray::_StatsActor", "ray::ActorLocationTracker", "ray::_AutoscalingCoordinatorActor",
           "ray::PlacementGroupCleaner", "sleep 1", "/bin/sh -c while kill -s 0")
FINISHED = ("data/seed_pairs.jsonl", "sft/model.safetensors", "eval/sft.parquet",
            "iter-0/train/final/model.safetensors", "iter-0/train/metrics.jsonl")
FAKE_WORKER_CPUS = 2  # logical CPUs of a fake worker (AWS would detect 8-16): all "nodes" share 2 real cores
FAKE_OBJECT_STORE = 150 * 2**20  # per node; the default (30% of RAM each) is far more than a micro loop needs
IDLE_MINUTES = 0.2
POLLER = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
with open(sys.argv[2], "a") as out:
    while True:
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        out.write(json.dumps({"t": time.time(), "nodes": nodes}) + "\\n")
        out.flush()
        time.sleep(0.5)
"""


def fake_cluster_config(gcs_address: str) -> dict:
    """cluster.yaml's node types on `fake_multinode`: the same names, labels, GPUs and min_workers; CPUs the
    cloud would detect become FAKE_WORKER_CPUS, at most one node per worker type (2 cores), no commands run."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    assert CLUSTER["head_node_type"] == FAKE_HEAD_NODE_TYPE, "the fake provider names its head this way"
    types = {}
    for name, node_type in CLUSTER["available_node_types"].items():
        resources = dict(node_type["resources"])
        if name != FAKE_HEAD_NODE_TYPE:
            resources = {"CPU": FAKE_WORKER_CPUS, **resources, "object_store_memory": FAKE_OBJECT_STORE}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node_type.get("min_workers", 0),
                       "max_workers": min(node_type.get("max_workers", 0), 1)}
    no_commands = {key: [] for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                                       "worker_setup_commands", "head_start_ray_commands",
                                       "worker_start_ray_commands", "cluster_synced_files", "rsync_exclude",
                                       "rsync_filter")}
    provider = {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                "disable_launch_config_check": True, "gcs_address": gcs_address}
    return {"cluster_name": "rayalign-fake", "max_workers": sum(t["max_workers"] for t in types.values()),
            "upscaling_speed": CLUSTER["upscaling_speed"], "idle_timeout_minutes": IDLE_MINUTES,
            "provider": provider, "auth": {}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
            "head_node_type": FAKE_HEAD_NODE_TYPE, "available_node_types": types, **no_commands}


def _start_head(temp_dir: Path, env: dict) -> tuple[str, str]:
    """`RAY_FAKE_CLUSTER=1 ray start --head` with the job API (`tests.ray_heads.start_head`) and cluster.yaml's
    node types as its autoscaling config; returns (GCS address, dashboard URL)."""
    port = free_port()
    config = fake_cluster_config(f"127.0.0.1:{port}")
    (temp_dir / "fake.yaml").write_text(yaml.safe_dump(config))
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    return start_head(temp_dir, env, MARKER, object_store_mb=FAKE_OBJECT_STORE // 2**20,
                      num_cpus=head.get("CPU", 0), port=port,
                      extra_args=(f"--autoscaling-config={temp_dir / 'fake.yaml'}",))


def _cluster_processes(temp_dir: Path, tag: str) -> list:
    """Exactly this cluster's processes: its temp dir on the command line or its marker in the environment,
    and their descendants (Ray renames its workers, which can hide both)."""
    import psutil

    found = {}
    for proc in psutil.process_iter(["cmdline", "environ"]):
        if str(temp_dir) in " ".join(proc.info["cmdline"] or []) or (proc.info["environ"] or {}).get(MARKER) == tag:
            found[proc.pid] = proc
    for proc in list(found.values()):
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _tear_down(temp_dir: Path, tag: str) -> None:
    import psutil

    for _ in range(3):  # a dying autoscaler may still start a node: sweep until nothing is left
        procs = _cluster_processes(temp_dir, tag)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.Error:
                    pass
            procs = psutil.wait_procs(procs, timeout=10)[1]
        time.sleep(1)
    survivors = [(p.pid, " ".join(p.cmdline())[:120]) for p in _cluster_processes(temp_dir, tag) if p.is_running()]
    assert not survivors, f"processes of the fake cluster survived: {survivors}"
    shutil.rmtree(temp_dir, ignore_errors=True)


def _snapshots(path: Path) -> list[dict]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _timeline(path: Path, start: float) -> list[tuple[int, list[str]]]:
    """(seconds since start, worker labels alive) at every change, for the log of a slow or failed run."""
    changes, last = [], None
    for snap in _snapshots(path):
        labels = sorted(k for node in snap["nodes"] for k in node if k.startswith("rayalign_"))
        if labels != last:
            changes.append((round(snap["t"] - start), labels))
            last = labels
    return changes


def _wait_for_head_only(path: Path, after: float, timeout: float) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [s["t"] for s in _snapshots(path) if s["t"] > after and len(s["nodes"]) == 1]
        if done:
            return done[0]
        time.sleep(1)
    raise AssertionError(f"still {len(_snapshots(path)[-1]['nodes'])} nodes {timeout:.0f} s after the run")


def _work_processes(tag: str) -> dict[int, str]:
    """The first job's own processes: its driver and the workers of its tasks and actors."""
    return {pid: c for pid, c in marked_processes(JOB_MARKER, tag).items() if not c.startswith(RAY_OWN)}


def _job_report(client, job_id: str) -> str:
    status, log = client.get_job_status(job_id).value, client.get_job_logs(job_id)
    return f"job {job_id} is {status}; its log ends:\n{log[-6000:]}"


def _inode_and_mtime(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {name: ((run_dir / name).stat().st_ino, (run_dir / name).stat().st_mtime_ns) for name in FINISHED}


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


def _submit_and_stop_after_iteration_0(client, job: list[str], env: dict, run_dir: Path, tag: str) -> dict:
    """Submit `job` (--no-wait), `ray job stop` it once iteration 0's training is final; check that it is
    STOPPED and that its processes and placement groups go. Returns its processes while it ran."""
    from ray.job_submission import JobStatus

    first = subprocess.run([*job, "--no-wait", "--env", f"{JOB_MARKER}={tag}"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    job_id, address = "rayalign-run-quick", job[job.index("--address") + 1]
    _wait_for(lambda: (run_dir / "iter-0/train/final").is_dir() or client.get_job_status(job_id).is_terminal(),
              900, "iteration 0's training to finish", lambda: _job_report(client, job_id))
    assert client.get_job_status(job_id) == JobStatus.RUNNING, _job_report(client, job_id)
    running = _work_processes(tag)  # all must go
    stop = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", job_id, "--address", address],
                          env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and client.get_job_status(job_id) == JobStatus.STOPPED, stop.stdout + stop.stderr
    assert any("rayalign.cli run" in c for c in running.values()), f"not the job's processes: {running}"
    _wait_for(lambda: not _work_processes(tag), 60, f"the stopped job's processes to exit: {_work_processes(tag)}")
    _wait_for(lambda: not _live_placement_groups(), 60, "the stopped job's placement groups to be removed")
    return running


def _resume(client, job: list[str], env: dict, run_dir: Path) -> None:
    """Without --resume the job is refused; with it, it SUCCEEDS and redoes no finished stage."""
    from ray.job_submission import JobStatus

    kept = _inode_and_mtime(run_dir)
    unresumed = subprocess.run(job, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert unresumed.returncode == 2 and "pass --resume" in unresumed.stderr, unresumed.stderr
    resumed = subprocess.run([*job, "--resume"], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    job_id = "rayalign-run-quick-r2"
    assert resumed.returncode == 0, resumed.stdout[-3000:] + "\n" + _job_report(client, job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    log = client.get_job_logs(job_id)
    for skipped in ("setup: pi_SFT found", "evaluation of sft: found eval/sft.parquet, skipped",
                    "iteration 0: training found in"):
        assert skipped in log, f"{skipped!r} not in the resumed job's log:\n{log[-4000:]}"
    assert _inode_and_mtime(run_dir) == kept, "a finished stage was redone"
    assert (run_dir / "report.md").is_file() and (run_dir / "eval/iter-0.parquet").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0] and all("win_rate_vs_sft" in m for m in metrics)


def _assert_scaled_for_the_run(nodes_log: Path, started: float, ended: float) -> None:
    during = [s["nodes"] for s in _snapshots(nodes_log) if started <= s["t"] <= ended]
    assert during and all(len(nodes) <= 3 for nodes in during)
    addresses = {k for nodes in during for node in nodes for k in node if k.startswith("node:")}
    assert addresses <= {"node:127.0.0.1", "node:__internal_head__"}, f"not on loopback: {addresses}"
    for label in ("rayalign_cpu", "rayalign_gpu"):
        assert any(label in node for nodes in during for node in nodes), f"no {label} worker was launched"


@pytest.mark.slow
def test_a_job_on_the_autoscaling_node_types_stops_resumes_and_scales_back(tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    tag, temp_dir = secrets.token_hex(4), Path(f"/tmp/ra-cl-{secrets.token_hex(2)}")  # sockets need short paths
    temp_dir.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    # Auth off on both sides (a token in ~/.ray would otherwise switch the head to token mode); Ray's "not a
    # multi-node platform" switch makes every node, driver and poller pick 127.0.0.1 rather than the host IP;
    # the venv first on PATH when the head starts, because job entrypoints run that PATH's `python`.
    env = {**own_ray_env(), "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", MARKER: tag,
           "PATH": f"{venv_bin}:{os.environ['PATH']}", "VIRTUAL_ENV": sys.prefix}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    run_dir, nodes_log, poller = tmp_path / "quick", tmp_path / "nodes.jsonl", None
    try:
        gcs, address = _start_head(temp_dir, {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        for key, value in (("RAY_AUTH_MODE", "disabled"), ("RAY_API_SERVER_ADDRESS", address)):
            monkeypatch.setenv(key, value)  # this process's job client: Ray's env vars beat its address argument
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        poller = subprocess.Popen([sys.executable, "-c", POLLER, gcs, str(nodes_log)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = _wait_for(lambda: _client(JobSubmissionClient, address), 60, "the dashboard's job API")
        job = [SUBMIT, "run", "configs/cluster_quickstart.yaml", f"run.dir={run_dir}", *SEED_ONLY_LOOP,
               "train.use_gpu=false", "--address", address]
        started = time.time()
        running = _submit_and_stop_after_iteration_0(client, job, env, run_dir, tag)
        stopped_after = time.time() - started
        _resume(client, job, env, run_dir)
        ended = time.time()
        _assert_scaled_for_the_run(nodes_log, started, ended)
        head_only = _wait_for_head_only(nodes_log, ended, timeout=IDLE_MINUTES * 60 + 90)
        print(f"jobs: stopped at {stopped_after:.0f} s ({sorted(set(c.split(' ')[0] for c in running.values()))}), "
              f"resumed run done at {ended - started:.0f} s; head only {head_only - ended:.0f} s later; worker "
              f"types over time: {_timeline(nodes_log, started)}")
    finally:
        if poller is not None:
            poller.kill()
            poller.wait()
        _tear_down(temp_dir, tag)
