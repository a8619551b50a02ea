"""The node cache of run storage (`rayalign.storage.materialize`): entries, locks, and eviction by size.

Layout: CACHE/<node>/<entry>/ with <entry> a 20-hex hash of a stored location and its commit, holding the
copy (CACHE/<node>/<entry>/<name>) and three small files:

    .use    every process that materialized the entry holds a shared flock on it until it ends: the entry
            is in use and never evicted (its files are read at load time; vLLM and a resumed trainer may
            read them long after `materialize` returned)
    .lock   an exclusive flock while the entry is filled: concurrent actors on a node download once
    .used   touched on each use: its mtime orders eviction, least recently used first

After an entry is filled, entries are evicted, least recently used first, until the node's entries fit in
RAYALIGN_CACHE_MAX_GB (default 50; 0: unbounded). The driver exports `run.cache_max_gb` there (Ray started
by the driver passes it to every worker; on a cluster set it in the job's env, e.g. `jobs/submit.sh --env`).
An evictor takes `.use` exclusively without waiting (an entry in use is skipped), renames the entry away,
then deletes it; a process that opened `.use` just before sees another inode once it has its lock and
retries. It does not bound the Ray Train scratch directories (CACHE/<node>/train), which end with the stage.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from pathlib import Path

DEFAULT_MAX_GB = 50.0
ENV = "RAYALIGN_CACHE_MAX_GB"
ENTRY = re.compile(r"[0-9a-f]{20}")
_HELD: dict[str, int] = {}  # entry -> fd of this process' shared lock on its .use (kept until exit)


def max_bytes() -> int:
    """The node cache's bound in bytes from RAYALIGN_CACHE_MAX_GB; 0: unbounded."""
    value = os.environ.get(ENV)
    return int(float(value if value not in (None, "") else DEFAULT_MAX_GB) * 2**30)


def export_bound(max_gb: float) -> None:
    """The driver's `run.cache_max_gb`, for itself and the Ray workers it starts (they inherit it)."""
    os.environ[ENV] = f"{max_gb:g}"


def _lock(path: Path, mode: int) -> int | None:
    """An open fd of `path` locked with `mode`; None when LOCK_NB and it is held. Retries while an evictor
    replaced the file between our open and our lock (the inode we locked is no longer at `path`)."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
        if mode & fcntl.LOCK_NB:
            return None


def hold(entry: Path) -> None:
    """Mark `entry` in use by this process (a shared lock on .use, released when the process ends)."""
    if str(entry) not in _HELD:
        _HELD[str(entry)] = _lock(entry / ".use", fcntl.LOCK_SH)


def release_all() -> None:
    """Drop this process' holds (tests; a process that is done loading may call it)."""
    for fd in _HELD.values():
        os.close(fd)
    _HELD.clear()


def fill_lock(entry: Path) -> int:
    """The entry's fill lock (exclusive); the caller holds the entry already, so it cannot vanish."""
    return _lock(entry / ".lock", fcntl.LOCK_EX)


def touch(entry: Path) -> None:
    used = entry / ".used"
    used.touch()
    # The clock's nanoseconds, set explicitly: a plain touch takes the kernel's coarse clock (ms ticks),
    # under which two uses in quick succession tie and the eviction order is arbitrary.
    now = time.time_ns()
    os.utime(used, ns=(now, now))


def _last_used(entry: Path) -> int:
    for path in (entry / ".used", entry):
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
    return 0


def _size(entry: Path) -> int:
    total = 0
    for path in entry.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # being renamed into place or away meanwhile
            pass
    return total


def evict(node_dir: Path, limit: int | None = None) -> list[str]:
    """Delete unused entries, least recently used first, until the node's entries fit in `limit` bytes
    (default RAYALIGN_CACHE_MAX_GB; 0: unbounded). Returns the evicted entries' names."""
    limit = max_bytes() if limit is None else limit
    if limit <= 0 or not node_dir.is_dir():
        return []
    entries = [p for p in node_dir.iterdir() if p.is_dir() and ENTRY.fullmatch(p.name)]
    sizes = {entry: _size(entry) for entry in entries}
    total, evicted = sum(sizes.values()), []
    for entry in sorted(entries, key=_last_used):
        if total <= limit:
            break
        fd = _lock(entry / ".use", fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is None:  # in use (or being filled): never evicted
            continue
        gone = node_dir / f".evicted-{entry.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(entry, gone)  # atomic: a reader either finds the whole entry or none
        finally:
            os.close(fd)
        shutil.rmtree(gone, ignore_errors=True)
        total -= sizes[entry]
        evicted.append(entry.name)
    return evicted
