"""Run storage (`run.storage`): the commit protocol and node cache on a local path and on S3 (moto's server
on 127.0.0.1), then a multi-node loop whose stages share nothing but the S3 bucket.

The unit tests take a few seconds. The loop test starts an in-process 3-node `ray.cluster_utils.Cluster`
(a head without CPUs for the driver; a "gen" node for generation, judging and reference scoring; a
"train" node for the Ray Train worker) with its own RAY_TMPDIR, so no other Ray on the machine can attach
to it, and runs the micro quickstart loop with run.storage on the bucket, then resumes it from an empty
run.dir on the same storage; and a DeepSpeed training run with one worker on each of two nodes, one killed
and restarted from the checkpoint both nodes wrote into storage.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rayalign.storage import MARKER, UNIT, RunStorage, join, materialize, open_uri
from rayalign.storage_resume import mirror
from tests.conftest import MICRO_LOOP, REPO

BUCKET = "rayalign-test"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with one bucket; stopped by its pid."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.2)
        endpoint = f"127.0.0.1:{port}"
        fs, _ = open_uri(_s3_uri(endpoint, "") + "&allow_bucket_creation=true")
        fs.create_dir(BUCKET)
        yield endpoint
    finally:
        server.kill()
        server.wait(timeout=10)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _s3_uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@pytest.fixture(params=["local", "s3"])
def storage_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "storage")
    return _s3_uri(request.getfixturevalue("s3_endpoint"), f"unit-{tmp_path.name}")


def _unit(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_uri_options_and_join(s3_endpoint):
    uri = _s3_uri(s3_endpoint, "runs/a")
    fs, path = open_uri(uri)
    assert (fs.type_name, path) == ("s3", f"{BUCKET}/runs/a")
    assert join(uri, "iter-0/train/final") == _s3_uri(s3_endpoint, "runs/a/iter-0/train/final")
    assert join("/data/store", "sft") == "/data/store/sft"


def test_publish_pull_units_and_files(storage_uri, tmp_path):
    store = RunStorage(storage_uri, tmp_path / "run")
    model = _unit(tmp_path / "run" / "sft", {"config.json": "{}", "sub/weights.bin": "w" * 1000})
    (tmp_path / "run" / "counts.json").write_text('{"pairs": 3}')
    assert not store.exists(model)
    store.publish(model, tmp_path / "run" / "counts.json")
    assert store.exists(model) and store.exists(tmp_path / "run" / "counts.json")
    assert store.committed_units(tmp_path / "run") == ["sft"]

    other = RunStorage(storage_uri, tmp_path / "elsewhere")  # another machine's empty run.dir
    assert other.pull(tmp_path / "elsewhere" / "sft") and other.pull(tmp_path / "elsewhere" / "counts.json")
    assert (tmp_path / "elsewhere" / "sft" / "sub" / "weights.bin").read_text() == "w" * 1000
    assert json.loads((tmp_path / "elsewhere" / "counts.json").read_text()) == {"pairs": 3}
    assert not other.pull(tmp_path / "elsewhere" / "missing")

    first = json.loads((model / MARKER).read_text())["id"]
    (model / "config.json").write_text('{"v": 2}')
    store.publish(model)  # a republished unit gets a new commit id: caches keyed by it see the new content
    assert json.loads((model / MARKER).read_text())["id"] != first
    other.pull(tmp_path / "elsewhere" / "sft")
    assert (tmp_path / "elsewhere" / "sft" / "config.json").read_text() == '{"v": 2}'
    store.delete(model)
    assert not store.exists(model) and store.committed_units(tmp_path / "run") == []


def test_uncommitted_unit_is_never_read_and_mirror_follows_storage(storage_uri, tmp_path):
    run = tmp_path / "run"
    store = RunStorage(storage_uri, run)
    store.publish(_unit(run / "sft", {"config.json": "{}"}), _unit(run / "data", {"a.jsonl": "1\n"}))
    (run / "iter-0.json").write_text("done")
    store.publish(run / "iter-0.json")
    fs = store.fs  # a crashed upload: the unit's first object and one file, no marker
    fs.create_dir(store.fs_path(run / "iter-0" / "final"), recursive=True)
    for name in (UNIT, "model.bin"):
        with fs.open_output_stream(f"{store.fs_path(run / 'iter-0' / 'final')}/{name}") as out:
            out.write(b"partial")
    assert not store.exists(run / "iter-0" / "final") and not store.pull(run / "iter-0" / "final")
    with pytest.raises(FileNotFoundError):
        materialize(store.location(run / "iter-0" / "final"))

    local = tmp_path / "resumed"  # a working copy ahead of storage, with a stale final/ and a stray file
    _unit(local / "iter-0" / "final", {"model.bin": "local"})
    _unit(local, {"iter-1.json": "unpublished", "config.yaml": "mine", "iter-0/train/checkpoints/x": "kept"})
    moved, aside = mirror(RunStorage(storage_uri, local))
    found = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert found == ["config.yaml", "data/_COMMITTED.json", "data/a.jsonl", "iter-0.json",
                     "iter-0/train/checkpoints/x", "sft/_COMMITTED.json", "sft/config.json"]
    assert not (local / "iter-0" / "final").exists()  # an empty final/ would read as a finished stage
    assert moved == ["iter-0/final", "iter-1.json"]  # never deleted: moved aside (rayalign.storage_resume)
    assert (aside / "iter-0" / "final" / "model.bin").read_text() == "local"


def test_materialize_caches_per_node_once(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    store = RunStorage(_s3_uri(s3_endpoint, f"cache-{tmp_path.name}"), run)
    store.publish(_unit(run / "model", {"config.json": '{"n": 1}', "w.bin": "x" * 100_000}))
    location = store.location(run / "model")
    with ThreadPoolExecutor(4) as pool:  # concurrent actors on one node
        paths = set(pool.map(materialize, [location] * 4))
    assert len(paths) == 1
    cached = Path(paths.pop())
    assert (cached / "w.bin").read_text() == "x" * 100_000 and cached.is_relative_to(tmp_path / "cache" / "local")
    assert len(list((tmp_path / "cache" / "local").iterdir())) == 1  # one download, no leftovers
    (run / "model" / "config.json").write_text('{"n": 2}')
    store.publish(run / "model")
    assert json.loads((Path(materialize(location)) / "config.json").read_text()) == {"n": 2}
    assert materialize(str(run / "model")) == str(run / "model")  # local paths (or a shared mount): as is


def test_materialize_keeps_the_node_cache_within_its_bound(s3_endpoint, tmp_path, monkeypatch):
    from rayalign import storage_cache

    monkeypatch.setenv("RAYALIGN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv(storage_cache.ENV, str(2500 / 2**30))  # room for two of the 1000-byte models
    run = tmp_path / "run"
    store = RunStorage(_s3_uri(s3_endpoint, f"bound-{tmp_path.name}"), run)
    locations = {}
    for name in ("a", "b", "c"):
        store.publish(_unit(run / name, {"w.bin": name * 1000}))
        locations[name] = store.location(run / name)
    node = tmp_path / "cache" / "local"
    try:
        for name in ("a", "b"):
            materialize(locations[name])
            storage_cache.release_all()  # the actors that loaded them are gone
        materialize(locations["a"])  # a used again: b is now the least recently used
        storage_cache.release_all()
        held = Path(materialize(locations["c"]))  # this process holds c (as a live actor would)
        assert sorted(p.name for p in node.glob("*/*") if not p.name.startswith(".")) == ["a", "c"]
        assert (held / "w.bin").read_text() == "c" * 1000
        materialize(locations["b"])  # c is in use: a goes, c stays although older than b
        assert sorted(p.name for p in node.glob("*/*") if not p.name.startswith(".")) == ["b", "c"]
    finally:
        storage_cache.release_all()


def test_remote_locations(storage_uri, tmp_path):
    store = RunStorage(storage_uri, tmp_path / "run")
    outside = _unit(tmp_path / "my-model", {"config.json": "{}"})
    assert store.remote("org/some-hub-model") == "org/some-hub-model"
    inside = _unit(tmp_path / "run" / "sft", {"config.json": "{}"})
    assert store.remote(str(inside)) == store.location(inside) and store.exists(inside)
    uploaded = store.remote(str(outside))
    assert "/inputs/my-model-" in uploaded and Path(materialize(uploaded), "config.json").read_text() == "{}"
    assert store.remote(uploaded) == uploaded  # a location stays one (no second upload)


RUN_ARTIFACTS = ("config.yaml", "data/seed_pairs.jsonl", "tiny-model", "sft", "eval/sft.parquet", "iter-0/seconds",
                 "iter-0/train/prepared/train.parquet", "iter-0/train/metrics.jsonl", "iter-0/train/final",
                 "eval/iter-0.parquet", "iter-1/samples.parquet", "iter-1/judged.parquet", "iter-1/judge_counts.json",
                 "iter-1/train/final", "eval/iter-1.parquet", "metrics.jsonl", "plots", "report.md")
STAGE_WORK = ("SFT of the tiny model", "generating", "evaluating", "training /")  # log lines of work done


@pytest.fixture(scope="module")
def three_nodes(s3_endpoint, tmp_path_factory):
    """Head (the driver's node, no CPUs), a "gen" node and a "train" node; each node caches on "its" disk."""
    import tempfile

    import psutil
    from ray.cluster_utils import Cluster

    ray_tmp = tempfile.mkdtemp(prefix="ra-st-", dir="/tmp")  # short: Ray's unix socket paths stay < 100 chars
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAYALIGN_CACHE_DIR", "RAY_ADDRESS")}
    # Ray's daemons and workers inherit these: the address file and sessions stay out of /tmp/ray, so no
    # other `ray.init()` on this machine can attach to this cluster; and none of them names the suite's head.
    os.environ.update(RAY_TMPDIR=ray_tmp, RAYALIGN_CACHE_DIR=str(tmp_path_factory.mktemp("node-caches")))
    os.environ.pop("RAY_ADDRESS", None)
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        # ds_slot: one per node, so that two Ray Train workers asking for one each land on different nodes
        gen = cluster.add_node(num_cpus=3, resources={"gen_node": 4, "ds_slot": 1})
        train = cluster.add_node(num_cpus=2, resources={"train_node": 1, "ds_slot": 1})
        cluster.wait_for_nodes()
        yield cluster, gen.node_id, train.node_id
    finally:
        if cluster is not None:
            cluster.shutdown()
        for proc in psutil.process_iter(["cmdline"]):  # anything of this cluster that outlived shutdown()
            if any(ray_tmp in part for part in proc.info["cmdline"] or ()):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _run_loop(cluster, run_dir: Path, overrides: list[str], *extra: str,
              env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "rayalign.cli", "run", "configs/quickstart.yaml", f"run.dir={run_dir}",
               *overrides, *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, time.perf_counter() - started


def _cached(cache: Path, node_id: str) -> set[str]:
    """Names of what a node materialized from storage (models, Parquet, checkpoints)."""
    return {p.name for p in (cache / node_id).glob("*/*")}


def test_loop_on_three_nodes_shares_only_storage(three_nodes, s3_endpoint, tmp_path):
    cluster, gen_node, train_node = three_nodes
    storage = _s3_uri(s3_endpoint, f"loop-{tmp_path.name}")
    overrides = [*MICRO_LOOP, f"run.storage={storage}", "generate.resources={gen_node: 1}",
                 "judge.resources={gen_node: 1}", "ref.resources={gen_node: 1}",
                 "train.resources_per_worker={train_node: 1}", "train.save_every=1", "train.max_failures=1",
                 # a judge per pass, so that pi_0 is read from storage on the gen node (a judge kept for the run,
                 # like the generator, gets its weights pushed in memory)
                 "judge.persistent=false"]
    # The training worker of iteration 0 (2 steps) is SIGKILLed before step 2: Ray Train restarts it, and it
    # resumes from checkpoints/step-1 as stored (iteration 1 has one step: the drill does not fire there).
    first, first_seconds = _run_loop(cluster, tmp_path / "a", overrides, env={"RAYALIGN_KILL_WORKER_AT": "2:0"})
    store = RunStorage(storage, tmp_path / "a")
    missing = [name for name in RUN_ARTIFACTS if not store.exists(tmp_path / "a" / name)]
    assert not missing, f"not committed in storage: {missing}"
    # iteration 0's (iteration 1 has one step: its end writes final/ only, no checkpoint)
    checkpoints = tmp_path / "a" / "iter-0" / "train" / "checkpoints"
    assert store.committed_units(checkpoints) == ["step-1"] and not checkpoints.exists()  # written on another node

    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "iter-0/train/metrics.jsonl").open()]
    assert steps == [1, 2]  # the restarted worker continued the stored log at the stored checkpoint

    # Where the stages ran: generation and judging loaded pi_SFT, the judge pi_0, from storage on the gen node; the
    # Ray Train worker read its data, and after the restart its checkpoint, on the train node; the driver's
    # node (the head) loaded nothing from storage.
    cache = Path(os.environ["RAYALIGN_CACHE_DIR"])
    assert {"sft", "final"} <= _cached(cache, gen_node)
    assert {"train.parquet", "step-1"} <= _cached(cache, train_node)
    assert not {"train.parquet", "step-1"} & _cached(cache, gen_node)
    assert sorted(p.name for p in cache.iterdir()) == sorted([gen_node, train_node])

    commits = {name: json.loads((tmp_path / "a" / name / MARKER).read_text())["id"]
               for name in ("sft", "iter-0/train/final", "iter-1/train/final")}
    second, second_seconds = _run_loop(cluster, tmp_path / "b", overrides, "--resume")  # an EMPTY run.dir
    print(f"multi-node loop {first_seconds:.0f} s, resume from storage {second_seconds:.0f} s")
    done = [line for line in second.stdout.splitlines() if any(work in line for work in STAGE_WORK)]
    assert not done, f"the resume redid work: {done}"
    assert second.stdout.count("skipped") >= 6
    assert {name: json.loads((tmp_path / "b" / name / MARKER).read_text())["id"] for name in commits} == commits
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == (tmp_path / "a" / "metrics.jsonl").read_text()
    assert (tmp_path / "b" / "report.md").is_file()


def test_deepspeed_workers_on_two_nodes_checkpoint_to_storage_and_resume_from_it(three_nodes, s3_endpoint,
                                                                                 tiny_model_dir, tmp_path):
    """ZeRO-3 (the 8B config's stage: parameters partitioned too) over 2 workers, one per node (nodes that share
    no disk): each rank's parameter and optimizer shards go into the stored checkpoint; rank 1 is SIGKILLed
    before step 3, Ray Train restarts the group, both nodes materialize checkpoints/step-2 from storage, and the
    run ends with the in-process oracle's losses and weights."""
    import copy

    import torch
    from safetensors.torch import load_file

    from rayalign.config_loader import load_config
    from rayalign.data import load_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs
    from rayalign.tasks.sentiment import gold_pairs
    from rayalign.train import split_eval

    cluster, gen_node, train_node = three_nodes
    data, run_dir = tmp_path / "pairs.jsonl", tmp_path / "run"
    data.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(32, seed=5)))
    storage = _s3_uri(s3_endpoint, f"ds-{tmp_path.name}")
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "RAYALIGN_KILL_WORKER_AT": "3:1"}
    command = [sys.executable, "-m", "rayalign.cli", "train", f"model.policy={tiny_model_dir}",
               f"data.train_file={data}", "data.max_completion_length=48", "optim.lr=5e-4", "optim.warmup_ratio=0",
               "optim.scheduler=constant",
               "train.global_batch_size=8", "train.num_workers=2", "train.engine=deepspeed", "train.zero_stage=3",
               "train.resources_per_worker={ds_slot: 1}", "train.save_every=2", "train.max_failures=1",
               f"run.storage={storage}", f"run.dir={run_dir}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    store = RunStorage(storage, run_dir)
    assert store.committed_units(run_dir / "checkpoints") == ["step-2"]
    marker = json.loads(store.fs.open_input_stream(store.fs_path(run_dir / "checkpoints/step-2") + "/" + MARKER)
                        .read())
    for kind in ("optim_states.pt", "model_states.pt"):  # ZeRO-3: one shard of each per rank
        shards = [name for name in marker["files"] if name.endswith(kind)]
        assert len(shards) == 2 and {"zero_pp_rank_0", "zero_pp_rank_1"} == {n.split("/")[-1][:14] for n in shards}
    cache = Path(os.environ["RAYALIGN_CACHE_DIR"])
    assert "step-2" in _cached(cache, gen_node) and "step-2" in _cached(cache, train_node)  # both resumed from it
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]

    config = load_config(run_dir / "config.yaml")
    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    rows, _ = split_eval(load_rows(str(data)).rows, config, tokenizer)
    history = train_pairs(model, copy.deepcopy(model).requires_grad_(False), tokenizer, rows, config)
    assert [h["loss"] for h in history] == pytest.approx([m["loss"] for m in steps], abs=1e-4)
    for name, value in load_file(run_dir / "final" / "model.safetensors").items():
        torch.testing.assert_close(value, model.state_dict()[name].detach(), atol=1e-4, rtol=0, msg=name)
