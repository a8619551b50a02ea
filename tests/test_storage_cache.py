"""The node cache's bound (`rayalign.storage_cache`): least recently used entries are evicted until the node's
entries fit, and an entry some live process holds (materialized, or being filled) never is. Tiny files, a
tiny bound, real flocks across processes; no storage needed (materialize itself: tests/test_storage.py).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayalign import storage_cache
from rayalign.config import Config, ConfigError
from tests.conftest import REPO


def _entry(node: Path, name: str, size: int, used: float) -> Path:
    entry = node / name
    (entry / "model").mkdir(parents=True)
    (entry / "model" / "w.bin").write_bytes(b"x" * size)
    storage_cache.touch(entry)
    os.utime(entry / ".used", (used, used))
    return entry


def _names(node: Path) -> list[str]:
    return sorted(p.name for p in node.iterdir())


@pytest.fixture(autouse=True)
def _no_holds():
    yield
    storage_cache.release_all()


def test_evicts_least_recently_used_until_within_the_bound(tmp_path):
    node, now = tmp_path / "node", time.time()
    a, b, c = (_entry(node, ch * 20, 1000, now - age) for ch, age in (("a", 30), ("b", 20), ("c", 10)))
    (node / "train" / "scratch").mkdir(parents=True)  # Ray Train's scratch dirs are no cache entries
    (node / "train" / "scratch" / "big").write_bytes(b"x" * 10_000)
    assert storage_cache.evict(node, limit=0) == []  # 0: unbounded
    assert storage_cache.evict(node, limit=2500) == [a.name]
    assert _names(node) == [b.name, c.name, "train"]
    storage_cache.touch(b)  # a use makes b the most recent: c goes next
    _entry(node, "d" * 20, 1000, now)
    assert storage_cache.evict(node, limit=2500) == [c.name]
    assert _names(node) == [b.name, "d" * 20, "train"]


def test_an_entry_in_use_is_never_evicted(tmp_path):
    node, now = tmp_path / "node", time.time()
    old, mid, new = (_entry(node, ch * 20, 1000, now - age) for ch, age in (("a", 30), ("b", 20), ("c", 10)))
    holder = subprocess.Popen(  # another actor on this node that materialized `old` and is still alive
        [sys.executable, "-c", "import sys; from pathlib import Path; from rayalign import storage_cache; "
         f"storage_cache.hold(Path({str(old)!r})); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        storage_cache.hold(new)  # and this process holds the newest
        assert storage_cache.evict(node, limit=1) == [mid.name]
        assert _names(node) == [old.name, new.name]
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    storage_cache.release_all()
    assert storage_cache.evict(node, limit=1) == [old.name, new.name]  # its holder ended: now it may go


def test_a_filling_entry_is_not_evicted(tmp_path):
    node = tmp_path / "node"
    entry = _entry(node, "e" * 20, 1000, time.time() - 100)
    storage_cache.hold(entry)  # materialize holds an entry before it fills it
    fd = storage_cache.fill_lock(entry)
    try:
        assert storage_cache.evict(node, limit=1) == []
    finally:
        os.close(fd)


def test_the_bound_is_a_run_setting_exported_to_the_workers(tmp_path, monkeypatch):
    from rayalign.storage import RunStorage

    monkeypatch.delenv(storage_cache.ENV, raising=False)
    assert storage_cache.max_bytes() == 50 * 2**30
    config = Config()
    assert config.run.cache_max_gb == 50.0
    with pytest.raises(ConfigError, match="run.cache_max_gb"):
        dataclasses.replace(config.run, cache_max_gb=-1.0)
    run = dataclasses.replace(config.run, dir=str(tmp_path / "run"), storage=str(tmp_path / "s"), cache_max_gb=0.5)
    assert RunStorage.from_config(dataclasses.replace(config, run=run)) is not None
    assert os.environ[storage_cache.ENV] == "0.5" and storage_cache.max_bytes() == 2**29
