"""Atomic file and directory writes, and run-directory naming.

Stages hand off through files under the run directory; a reader must never see a half-written one.
Everything here writes to a temporary sibling and `os.replace`s it into place (atomic on POSIX within
one filesystem). It does not handle remote object stores; those come with `run.storage`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes without error.

    An existing `path` is replaced. A crash inside the block leaves `path` untouched and removes the
    temporary directory, so a resume never reads a half-written checkpoint or artifact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = _temp_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def new_run_dir(root: str | Path = "runs") -> Path:
    """A fresh, not yet existing `root/<YYYYmmdd-HHMMSS>-<4 hex>` path (created by the caller)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{stamp}-{uuid.uuid4().hex[:4]}"
