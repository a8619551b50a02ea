"""cluster.yaml, offline: Ray's schema, the install it runs, the placement config and the security defaults.

Ray's own validator (`validate_config(prepare_config(...))`), the setup commands against the Makefile's
install recipe (so the two cannot drift apart silently), configs/cluster_quickstart.yaml against
quickstart.yaml and the resources the node types advertise, and the security defaults (no SSH from
0.0.0.0/0: every node type names its security group; every worker type has an explicit instance profile
limited to the run bucket). Its node types autoscaling under a real job: tests/test_cluster_jobs.py.
It does not reach AWS.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml

from tests.conftest import REPO

CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
HEAD, CPU_WORKER, GPU_WORKER = "ray.head.default", "ray.worker.cpu", "ray.worker.gpu"
GPU8_WORKER = "ray.worker.gpu8"  # the 8-GPU node of configs/gpu/llama8b_ultrafeedback_spa.yaml
WORKERS = (CPU_WORKER, GPU_WORKER, GPU8_WORKER)
# Which install each node type runs (its effective command list, Ray's merge rules) and with which extras.
EXTRAS = {HEAD: "dev", CPU_WORKER: "dev", GPU_WORKER: "dev,vllm", GPU8_WORKER: "dev,vllm"}
# generate/judge.persistent are off on the cluster: an actor kept for the run would keep its node from scaling down.
PLACEMENT = {("generate", "resources"), ("generate", "persistent"), ("judge", "resources"), ("judge", "persistent"),
             ("ref", "resources"), ("train", "resources_per_worker"), ("train", "use_gpu")}
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
