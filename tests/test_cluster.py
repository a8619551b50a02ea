"""cluster.yaml: Ray's schema, the install it runs, and its node types autoscaling under a reduced loop.

The first tests are offline checks of the file a user hands to `ray up`: Ray's own validator
(`validate_config(prepare_config(...))`), the setup commands against the Makefile's install recipe (so the
two cannot drift apart silently), configs/cluster_quickstart.yaml against quickstart.yaml and the
resources the node types advertise, and the security defaults (no SSH from 0.0.0.0/0: every node type names
its security group; every worker type has an explicit instance profile limited to the run bucket). The
last test maps the same node types onto Ray's `fake_multinode` provider (the real autoscaler, worker
"nodes" as local raylets), starts a head that has none of the stages' resources, runs SEED_ONLY_LOOP with
configs/cluster_quickstart.yaml and checks that both worker types were launched, the run completed, and
the cluster shrank back to the head after the idle timeout.

Ray safety (other Ray clusters run on this machine): the head gets its own short temp dir, explicit free
ports and a marker variable in its environment; teardown kills exactly the processes carrying either
(never `ray stop`, never `AutoscalingCluster.start()`, which runs `ray stop --force`) and asserts none survive.
It does not reach AWS: nothing here launches a cloud node.
"""

from __future__ import annotations

import copy
import json
import os
import re
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
from tests.ray_heads import free_port

CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
HEAD, CPU_WORKER, GPU_WORKER = "ray.head.default", "ray.worker.cpu", "ray.worker.gpu"
GPU8_WORKER = "ray.worker.gpu8"  # the 8-GPU node of configs/gpu/llama8b_ultrafeedback_spa.yaml
WORKERS = (CPU_WORKER, GPU_WORKER, GPU8_WORKER)
# Which install each node type runs (its effective command list, Ray's merge rules) and with which extras.
EXTRAS = {HEAD: "dev", CPU_WORKER: "dev", GPU_WORKER: "dev,vllm", GPU8_WORKER: "dev,vllm"}
# generate.persistent is off on the cluster: a generator kept for the run would keep its node from scaling down.
PLACEMENT = {("generate", "resources"), ("generate", "persistent"), ("judge", "resources"), ("ref", "resources"),
             ("train", "resources_per_worker"), ("train", "use_gpu")}
MARKER = "RAYALIGN_TEST_CLUSTER"  # in the fake head's environment, inherited by every process it starts


def _setup_commands(node_type: str) -> list[str]:
    """The commands Ray runs on a node of this type: a type's worker_setup_commands replace the global ones."""
    if node_type == CLUSTER["head_node_type"]:
        return CLUSTER["setup_commands"] + CLUSTER["head_setup_commands"]
    own = CLUSTER["available_node_types"][node_type].get("worker_setup_commands")
    return own if own is not None else CLUSTER["setup_commands"] + CLUSTER["worker_setup_commands"]


def _makefile_install(venv_bin: str, extras: str) -> list[str]:
    """The pip lines of the Makefile's install recipe, with its variables filled in."""
    text = (REPO / "Makefile").read_text()
    recipe = text.split("$(STAMP): pyproject.toml\n", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in recipe.splitlines() if "pip install" in line]
    assert len(lines) >= 2, recipe  # pip itself, then everything with torch pinned
    return [line.replace("$(BIN)", venv_bin).replace("$(EXTRAS)", extras) for line in lines]


def test_cluster_yaml_validates_with_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(CLUSTER))
    validate_config(prepared)  # raises on any schema violation
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    assert set(types) == {HEAD, *WORKERS} and prepared["head_node_type"] == HEAD
    assert types[HEAD]["resources"]["CPU"] == 0, "the head only runs the driver"
    assert types[GPU_WORKER]["resources"]["GPU"] >= 1 and "GPU" not in types[CPU_WORKER]["resources"]
    assert types[GPU8_WORKER]["resources"]["GPU"] == 8
    for name in WORKERS:
        assert 0 == types[name]["min_workers"] < types[name]["max_workers"], name
    assert sum(types[n]["max_workers"] for n in WORKERS) <= prepared["max_workers"]
    assert 0 < prepared["idle_timeout_minutes"] <= 30
    # The run storage is the object store, passed per run; the config must say how.
    assert "run.storage=s3://" in (REPO / "cluster.yaml").read_text()


@pytest.mark.parametrize("node_type", [HEAD, *WORKERS])
def test_setup_commands_install_like_the_makefile(node_type):
    commands = _setup_commands(node_type)
    venv = re.search(r"python3 -m venv (\S+)", " ".join(commands))
    assert venv, f"{node_type}: no venv is created"
    normalized = [re.sub(r"^cd \S+ && ", "", c) for c in commands]
    expected = _makefile_install(f"{venv.group(1)}/bin", EXTRAS[node_type])
    positions = [normalized.index(line) if line in normalized else -1 for line in expected]
    assert -1 not in positions and positions == sorted(positions), (
        f"{node_type}: the Makefile's install {expected} is not run in order by {commands}")
    pips = [c for c in commands if "pip install" in c and ("torch" in c or "-e " in c)]
    assert pips and all("torch==2.13.0" in c for c in pips), f"{node_type}: an install without the torch pin"
    assert set(EXTRAS[node_type].split(",")) <= set(_pyproject_extras())
    # The project's source is what file_mounts put where the install runs.
    assert any(c.startswith(f"cd {dest} && ") for c in commands for dest in _mounted_project_dirs())


def _pyproject_extras() -> list[str]:
    import tomllib

    return list(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _mounted_project_dirs() -> set[str]:
    mounts = CLUSTER["file_mounts"]
    assert {"./pyproject.toml", "./README.md", "./rayalign"} <= set(mounts.values()), mounts
    return {remote.rsplit("/", 1)[0] for remote, local in mounts.items() if local == "./pyproject.toml"}


def test_cluster_quickstart_is_the_quickstart_placed_on_the_node_types():
    from rayalign.config_loader import load_config

    quick = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    placed = yaml.safe_load((REPO / "configs/cluster_quickstart.yaml").read_text())
    stripped, quick = copy.deepcopy(placed), copy.deepcopy(quick)
    for section, key in PLACEMENT:
        stripped.get(section, {}).pop(key, None)
        quick.get(section, {}).pop(key, None)
    assert {k: v for k, v in stripped.items() if v} == quick, "cluster_quickstart.yaml drifted from quickstart.yaml"
    config = load_config(REPO / "configs/cluster_quickstart.yaml")
    types = CLUSTER["available_node_types"]
    requests = [config.generate.resources, config.judge.resources, config.ref.resources,
                config.train.resources_per_worker]
    for request in requests:
        assert request, "every stage is placed"
        assert any(set(request) <= set(t["resources"]) for n, t in types.items() if n != HEAD), request
    train_types = [t for t in types.values() if set(config.train.resources_per_worker) <= set(t["resources"])]
    assert config.train.use_gpu and all(t["resources"].get("GPU", 0) >= 1 for t in train_types)


WORLD = ("0.0.0.0/0", "::/0")
RAY_DEFAULT_PROFILE = "ray-autoscaler-v1"  # Ray's head role: EC2 and S3 on the whole account


def test_no_node_type_leaves_ssh_open_to_the_world():
    """Ray creates a security group with SSH from 0.0.0.0/0 for every node type without SecurityGroupIds;
    each type names the group from the header instead, whose SSH source is the SSH_CIDR setting."""
    from ray.autoscaler._private.aws.config import _configure_security_group

    for name, node_type in CLUSTER["available_node_types"].items():
        groups = node_type["node_config"].get("SecurityGroupIds")
        assert groups and all(isinstance(g, str) and g.startswith("sg-") for g in groups), name
    rules = CLUSTER["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not [r for r in rules for ip in r.get("IpRanges", []) + r.get("Ipv6Ranges", [])
                if ip.get("CidrIp", ip.get("CidrIpv6")) in WORLD]
    # Ray's own step (offline here: with a group on every type it returns before calling AWS) keeps them.
    config = copy.deepcopy(CLUSTER)
    assert _configure_security_group(config)["available_node_types"] == CLUSTER["available_node_types"]
    header = _header()
    ssh = [line for line in header.split("authorize-security-group-ingress")[1:] if "--port 22" in line]
    assert ssh and all("--cidr $SSH_CIDR" in line and not any(w in line for w in WORLD) for line in ssh), ssh


def _header() -> str:
    text = (REPO / "cluster.yaml").read_text()
    return " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))


def test_every_worker_type_has_a_bucket_only_instance_profile():
    types = CLUSTER["available_node_types"]
    workers = [name for name in types if name != CLUSTER["head_node_type"]]
    profiles = {name: types[name]["node_config"].get("IamInstanceProfile") for name in workers}
    for name, profile in profiles.items():
        assert profile and (profile.get("Name") or profile.get("Arn")), f"{name}: no explicit IamInstanceProfile"
        assert RAY_DEFAULT_PROFILE not in json.dumps(profile), f"{name}: Ray's account-wide role"
    # The header documents the policy of that profile: S3 actions on the run bucket, nothing else.
    name = profiles[workers[0]]["Name"]
    header = _header()
    assert f"--instance-profile-name {name}" in header
    text = header.split("worker-policy.json (", 1)[1]
    policy, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
        assert statement["Resource"] in ("arn:aws:s3:::BUCKET", "arn:aws:s3:::BUCKET/*"), statement


# --- cluster.yaml's node types on Ray's fake multi-node provider -------------------------------------------
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


def _start_head(temp_dir: Path, env: dict) -> str:
    """`RAY_FAKE_CLUSTER=1 ray start --head` in its own temp dir and ports; returns the GCS address."""
    gcs = f"127.0.0.1:{free_port()}"
    config = fake_cluster_config(gcs)
    (temp_dir / "fake.yaml").write_text(yaml.safe_dump(config))
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    command = [ray_cli, "start", "--head", f"--autoscaling-config={temp_dir / 'fake.yaml'}", f"--temp-dir={temp_dir}",
               f"--port={gcs.rsplit(':', 1)[1]}", f"--dashboard-port={free_port()}", "--include-dashboard=false",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={head.get('CPU', 0)}",
               f"--object-store-memory={FAKE_OBJECT_STORE}", "--disable-usage-stats"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return gcs


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


@pytest.mark.slow
def test_node_types_autoscale_for_the_loop_and_back(tmp_path):
    tag, temp_dir = secrets.token_hex(4), Path(f"/tmp/ra-cl-{secrets.token_hex(2)}")  # sockets need short paths
    temp_dir.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    # Auth off on both sides (a token in ~/.ray would otherwise switch the head to token mode); Ray's "not a
    # multi-node platform" switch makes every node, driver and poller pick 127.0.0.1 rather than the host IP.
    env = {**own_ray_env(), "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", MARKER: tag,
           "PATH": f"{venv_bin}:{os.environ['PATH']}"}
    nodes_log, poller, run = tmp_path / "nodes.jsonl", None, None
    try:
        gcs = _start_head(temp_dir, {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
        poller = subprocess.Popen([sys.executable, "-c", POLLER, gcs, str(nodes_log)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.time()
        run = subprocess.run([sys.executable, "-m", "rayalign.cli", "run", "configs/cluster_quickstart.yaml",
                              f"run.dir={tmp_path / 'run'}", *SEED_ONLY_LOOP, "train.use_gpu=false"],
                             cwd=REPO, env={**env, "RAY_ADDRESS": gcs}, capture_output=True, text=True, timeout=900)
        ended = time.time()
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert (tmp_path / "run/report.md").exists() and (tmp_path / "run/iter-0/train/final").is_dir()
        during = [s["nodes"] for s in _snapshots(nodes_log) if started <= s["t"] <= ended]
        assert during and all(len(nodes) <= 3 for nodes in during)
        addresses = {k for nodes in during for node in nodes for k in node if k.startswith("node:")}
        assert addresses <= {"node:127.0.0.1", "node:__internal_head__"}, f"not on loopback: {addresses}"
        for label in ("rayalign_cpu", "rayalign_gpu"):
            assert any(label in node for nodes in during for node in nodes), f"no {label} worker was launched"
        head_only = _wait_for_head_only(nodes_log, ended, timeout=IDLE_MINUTES * 60 + 90)
        print(f"run {ended - started:.0f} s; head only {head_only - ended:.0f} s after the run; worker types "
              f"over time: {_timeline(nodes_log, started)}")
    finally:
        for proc in (poller,):
            if proc is not None:
                proc.kill()
                proc.wait()
        _tear_down(temp_dir, tag)
