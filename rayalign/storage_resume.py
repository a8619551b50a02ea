"""`--resume` with `run.storage`: bring run.dir up to storage's committed state without losing local files.

Storage is the run's truth, so run.dir becomes a mirror of it; but nothing local is ever deleted. What the
mirror would remove or replace (files storage lacks, units committed differently, plain files whose bytes
differ) is handled by one rule:

    storage holds no run   (nothing committed, no config.yaml: a mistyped location, or storage added to a
                            run that lived only in run.dir) -> refused with one line; nothing is changed
    storage holds a run    (run.dir ahead of it after a kill before a publish, or another run's copy)
                            -> those local files are moved to RUN_DIR.local-<timestamp>, same layout, and
                            the line names that folder; the stages they belong to are redone

config.yaml, checkpoints/, ray/, ref_cache/ and temporary files are neither mirrored nor moved (training
reads checkpoints from storage itself; the reference cache is keyed by content). It does not merge a
local run into storage.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rayalign.storage import MARKER, UNIT, RunStorage, _excluded, _fs, _read_marker


def stored_state(store: RunStorage) -> tuple[dict[str, dict], set[str]]:
    """(committed units: key -> marker, plain files: keys) in storage, without what is not mirrored."""
    selector = _fs().FileSelector(store.root, recursive=True, allow_not_found=True)
    keys = [i.path[len(store.root) + 1:] for i in store.fs.get_file_info(selector) if i.type == _fs().FileType.File]
    units = {k.rsplit("/", 1)[0] for k in keys if k.rsplit("/", 1)[-1] == UNIT and "/" in k}
    committed = {}
    for unit in sorted(units):
        if not _excluded(unit, is_dir=True) and (marker := _read_marker(store.fs, store._path(unit))):
            committed[unit] = marker
    plain = {k for k in keys if not _excluded(k) and not any(k.startswith(u + "/") for u in units)}
    return committed, plain


def local_differences(store: RunStorage, committed: dict[str, dict], plain: set[str]) -> list[str]:
    """Keys (relative to run.dir) of local units and files that mirroring would delete or replace."""
    found: list[str] = []
    seen_units: set[str] = set()
    for file in sorted(store.local_root.rglob("*")):
        key = file.relative_to(store.local_root).as_posix()
        if not file.is_file() or _excluded(key):
            continue
        unit = next((u for u in committed if key.startswith(u + "/")), None)
        if unit is not None:
            if unit not in seen_units and _local_marker(store.local_root / unit) != committed[unit]:
                found.append(unit)  # committed differently in storage (or never committed here): the whole unit
            seen_units.add(unit)
        elif key not in plain or not _same_file(store, key):
            found.append(key)
    return _collapse(store.local_root, found)


def _collapse(root: Path, keys: list[str]) -> list[str]:
    """`keys` with the files of a folder replaced by the folder, where every file in it is among them
    (iter-1/train/final rather than its files; not iter-1/train when it also holds checkpoints/)."""
    def covered(file: Path) -> bool:
        name = file.relative_to(root).as_posix()
        return any(name == k or name.startswith(k + "/") for k in keys)

    result: list[str] = []
    for key in keys:
        parts = key.split("/")
        folders = ("/".join(parts[:i]) for i in range(1, len(parts)))  # outermost first
        best = next((d for d in folders if all(covered(f) for f in (root / d).rglob("*") if f.is_file())), key)
        if not any(best == r or best.startswith(r + "/") for r in result):
            result.append(best)
    return result


def _local_marker(local: Path) -> dict | None:
    import json

    try:
        return json.loads((local / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _same_file(store: RunStorage, key: str) -> bool:
    local = store.local_root / key
    path = store._path(key)
    if store.fs.get_file_info(path).size != local.stat().st_size:
        return False
    with store.fs.open_input_stream(path) as stored:
        return stored.read() == local.read_bytes()


def move_aside(store: RunStorage, keys: list[str]) -> Path:
    """Move `keys` (files or unit directories) from run.dir to a new RUN_DIR.local-<timestamp>, same layout."""
    base = store.local_root.with_name(f"{store.local_root.name}.local-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = base, 1
    while aside.exists():
        aside, n = base.with_name(f"{base.name}-{n}"), n + 1
    for key in keys:
        target = aside / key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(store.local_root / key, target)  # a sibling of run.dir: same filesystem, a rename
    return aside


def mirror(store: RunStorage) -> tuple[list[str], Path | None]:
    """Make run.dir a copy of storage's committed state; local files it would delete or replace are moved
    aside first. Returns (what was moved, where to; None when nothing was)."""
    committed, plain = stored_state(store)
    moved = local_differences(store, committed, plain)
    aside = move_aside(store, moved) if moved else None
    for unit in committed:
        store.pull(store.local_root / unit)
    for key in sorted(plain):
        if not (store.local_root / key).is_file():  # present ones are the same bytes (else moved aside)
            store.pull(store.local_root / key)
    _remove_empty_folders(store.local_root)  # an empty final/ would read as a finished stage
    return moved, aside


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()


def _examples(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(keys, key=lambda k: "final" not in k.split("/"))[:limit])  # models first
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def resume_from_storage(store: RunStorage, location: str) -> None:
    """--resume: refuse (storage holds no run) or mirror storage into run.dir, moving differing files aside."""
    from rayalign.config import ConfigError

    try:
        committed, plain = stored_state(store)
        differing = local_differences(store, committed, plain)
        holds_run = bool(committed or plain) or store.exists(store.local_root / "config.yaml")
    except OSError as exc:  # a missing bucket, no credentials: say which location
        raise ConfigError(f"run.storage: cannot read {location}: {exc}") from None
    if differing and not holds_run:
        raise ConfigError(
            f"run.storage: {location} holds no run, but run.dir {store.local_root} does ({_examples(differing)}); "
            "nothing in it was moved or deleted: check run.storage (mistyped?), or resume without run.storage")
    moved, aside = mirror(store)
    if aside:
        print(f"rayalign run: run.dir {store.local_root} held {len(moved)} file(s) or folder(s) that {location} "
              f"lacks or holds differently ({_examples(moved)}): moved to {aside}; their stages are redone",
              flush=True)
    print(f"rayalign run: mirrored the committed state of {location} into {store.local_root}", flush=True)


def start_run(config, *, resume: bool) -> RunStorage | None:
    """The loop's storage: refuse to overwrite a stored run, mirror it into run.dir on --resume."""
    from rayalign.config import ConfigError

    store = RunStorage.from_config(config)
    if store is None:
        return None
    config_file = store.local_root / "config.yaml"
    if store.exists(config_file) and not resume:
        raise ConfigError(f"run.storage: {config.run.storage} already holds a run; pass --resume to continue it")
    if resume:
        resume_from_storage(store, config.run.storage)
    store.publish(config_file)
    return store
