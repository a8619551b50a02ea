"""Run storage (`run.storage`): the commit protocol and node cache on a local path and on S3 (moto's server
on 127.0.0.1), then a multi-node loop whose stages share nothing but the S3 bucket.

The unit tests take a few seconds. The loop test starts an in-process 3-node `ray.cluster_utils.Cluster`
(a head without CPUs for the driver; a "gen" node for generation, judging and reference scoring; a
"train" node for the Ray Train worker) with its own RAY_TMPDIR, so no other Ray on the machine can attach
to it, and runs the micro quickstart loop with run.storage on the bucket, then resumes it from an empty
run.dir on the same storage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rayalign.storage import MARKER, UNIT, RunStorage, join, materialize, open_uri

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
    RunStorage(storage_uri, local).mirror()
    found = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert found == ["config.yaml", "data/_COMMITTED.json", "data/a.jsonl", "iter-0.json",
                     "iter-0/train/checkpoints/x", "sft/_COMMITTED.json", "sft/config.json"]
    assert not (local / "iter-0" / "final").exists()  # an empty final/ would read as a finished stage


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


def test_remote_locations(storage_uri, tmp_path):
    store = RunStorage(storage_uri, tmp_path / "run")
    outside = _unit(tmp_path / "my-model", {"config.json": "{}"})
    assert store.remote("org/some-hub-model") == "org/some-hub-model"
    inside = _unit(tmp_path / "run" / "sft", {"config.json": "{}"})
    assert store.remote(str(inside)) == store.location(inside) and store.exists(inside)
    uploaded = store.remote(str(outside))
    assert "/inputs/my-model-" in uploaded and Path(materialize(uploaded), "config.json").read_text() == "{}"
