"""Run storage (`run.storage`): a run's durable copy on a local path or any pyarrow filesystem URI.

On a cluster no two nodes share a disk, so with `run.storage` set the storage is the run's source of truth
and `run.dir` is the driver's working copy, laid out the same (`RUN_DIR/a/b` <-> `STORAGE/a/b`):

    driver     writes a stage's outputs in run.dir as before, then `publish`es them, its marker last
    actors     (Generator, Judge, PairEncoder, ReferenceScorer) get storage locations of their models and
               `materialize` them into a node-local cache
    training   Ray Train workers read their inputs from storage, write into a node-local scratch run dir
               and rank 0 publishes metrics, checkpoints/step-N and final/ (last: the stage's marker);
               Ray Train's own run state goes to STORAGE/.../ray (RunConfig storage_filesystem)
    --resume   `rayalign.storage_resume.start_run` makes run.dir a mirror of storage's committed state
               first, so a machine with an empty run.dir continues where the run stopped. It never deletes:
               a storage holding no run while run.dir holds one is refused (a mistyped location); local
               files a stored run lacks or holds differently are moved to RUN_DIR.local-<timestamp>

Object stores have no atomic rename, hence a commit protocol for directories ("units": models,
checkpoints, plots): `_UNIT` is written first (it marks the prefix as a unit), then the files, then
`_COMMITTED.json` (a fresh id and the file list). Readers trust only units with that marker and read only
the files it lists; republishing deletes the marker first. A single file is one object, whole or absent.
The node cache is keyed by location + commit id (files: + size and mtime) and filled under a file lock
into a temporary sibling that is renamed into place, so concurrent actors on a node download once; it is
bounded by `run.cache_max_gb`, evicting least recently used entries no process holds (`storage_cache`).
Credentials come from the filesystem's usual sources (for S3: AWS_* variables, instance profiles); URIs
may carry pyarrow's options, e.g. s3://bucket/run?endpoint_override=127.0.0.1:9000&scheme=http.

Without `run.storage` none of this runs. The node cache lives in RAYALIGN_CACHE_DIR (default
<tmp>/rayalign-cache). A unit can also be written by several processes (`open_unit`, `upload_files` from
each, `commit_unit` with all their names): DeepSpeed's checkpoints, whose ranks each write their own shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from rayalign import storage_cache

UNIT = "_UNIT"
MARKER = "_COMMITTED.json"
NOT_MIRRORED = ("config.yaml",)  # the driver writes its own before syncing
KEPT_CONFIG = re.compile(r"config\.\d+\.yaml")  # earlier versions the driver keeps (rayalign.run_dir): local only
# read by training from storage itself, Ray Train's state, the driver's reference cache (keyed by content)
NOT_MIRRORED_DIRS = ("checkpoints", "ray", "ref_cache")
TEMPORARY = (".tmp-", ".pull-", ".old-")  # siblings that atomic writes rename into place (io, _atomic_local)


def _fs():
    import pyarrow.fs

    return pyarrow.fs


def is_uri(location: str) -> bool:
    return "://" in str(location)


def open_uri(location: str):
    """(pyarrow filesystem, path inside it) of a URI or a local path."""
    fs = _fs()
    if not is_uri(location):
        return fs.LocalFileSystem(), str(Path(location).expanduser().absolute())
    return fs.FileSystem.from_uri(str(location))


def join(location: str, key: str) -> str:
    """`location`/`key`, keeping a URI's query (its filesystem options) at the end."""
    if not key:
        return location
    if not is_uri(location):
        return str(Path(location) / key)
    parts = urlsplit(location)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + key))


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _is_local(fs) -> bool:
    return isinstance(fs, _fs().LocalFileSystem)


def _download(fs, path: str, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    with fs.open_input_stream(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def _upload(fs, local: Path, path: str) -> None:
    """One object: whole or absent (an object PUT; on a local filesystem a rename into place)."""
    target = path if not _is_local(fs) else f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    if _is_local(fs):  # object stores need no parent "directories"
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with open(local, "rb") as src, fs.open_output_stream(target) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    if target != path:
        fs.move(target, path)


def _write_object(fs, path: str, data: bytes) -> None:
    with tempfile.NamedTemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        _upload(fs, Path(handle.name), path)


def _read_marker(fs, path: str) -> dict | None:
    """The unit's commit marker, None when there is none; other errors (network, permissions) propagate
    rather than pass for "not committed"."""
    try:
        with fs.open_input_stream(f"{path}/{MARKER}") as handle:
            return json.loads(handle.read())
    except (FileNotFoundError, NotADirectoryError):
        return None


def _unit_files(local: Path) -> list[Path]:
    return sorted(p for p in local.rglob("*") if p.is_file() and p.name not in (UNIT, MARKER))


@contextlib.contextmanager
def _atomic_local(target: Path):
    """A temporary sibling path that replaces `target` (a file or a directory) if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.pull-{uuid.uuid4().hex[:8]}")
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if target.is_dir():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def _copy_unit(fs, path: str, marker: dict, local: Path) -> None:
    """Download a committed unit's listed files (and its marker) into a new directory `local`."""
    local.mkdir(parents=True)
    for name in marker["files"]:
        _download(fs, f"{path}/{name}", local / name)
    (local / MARKER).write_text(json.dumps(marker))


def node_cache_dir() -> Path:
    """This node's cache: RAYALIGN_CACHE_DIR (default <tmp>/rayalign-cache) / <Ray node id or "local">."""
    root = Path(os.environ.get("RAYALIGN_CACHE_DIR") or Path(tempfile.gettempdir()) / "rayalign-cache")
    node = "local"
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return root / node


def fingerprint(location: str) -> str:
    """What identifies a stored unit's or file's content: its commit id, or size and mtime."""
    fs, path = open_uri(location)
    marker = _read_marker(fs, path)
    if marker:
        return f"{location}#{marker['id']}"
    info = fs.get_file_info(path)
    if info.type != _fs().FileType.File:
        raise FileNotFoundError(f"{location}: not in storage (no committed directory or file there)")
    return f"{location}#{info.size}:{info.mtime_ns}"


def materialize(location: str) -> str:
    """A local path holding `location`: itself when local, else this node's cached copy of it.

    A directory must be a committed unit. Concurrent callers on one node download it once.
    """
    fs, path = open_uri(location)
    if _is_local(fs):  # a local path or shared mount: read in place, if it is no uncommitted unit
        if (Path(path) / UNIT).exists() and not (Path(path) / MARKER).exists():
            raise FileNotFoundError(f"{location}: an unfinished upload (no {MARKER}); not reading it")
        return location if not is_uri(location) else path
    key = fingerprint(location)
    node = node_cache_dir()
    entry = node / _hash(key)
    target = entry / (path.rstrip("/").rsplit("/", 1)[-1] or "root")
    storage_cache.hold(entry)  # in use by this process from now on: never evicted under it
    if not target.exists():
        fd = storage_cache.fill_lock(entry)  # the first actor downloads; the others wait, then reuse it
        try:
            if not target.exists():
                marker = _read_marker(fs, path)
                with _atomic_local(target) as tmp:
                    _copy_unit(fs, path, marker, tmp) if marker else _download(fs, path, tmp)
        finally:
            os.close(fd)
        storage_cache.touch(entry)
        storage_cache.evict(node)  # the node's entries back within RAYALIGN_CACHE_MAX_GB, oldest first
    storage_cache.touch(entry)
    return str(target)


def _excluded(key: str, *, is_dir: bool = False) -> bool:
    """Not mirrored: config.yaml and its kept versions, anything in checkpoints/, ray/ or ref_cache/, temporary
    files and folders."""
    parts = key.split("/")
    folders = parts if is_dir else parts[:-1]
    return (key in NOT_MIRRORED or bool(KEPT_CONFIG.fullmatch(key)) or any(p in NOT_MIRRORED_DIRS for p in folders)
            or any(p.startswith(".") and any(t in p for t in TEMPORARY) for p in parts) or ".tmp-" in parts[-1])


class RunStorage:
    """A local run directory bound to its storage location: `local_root/a/b` <-> `uri/a/b`."""

    def __init__(self, uri: str, local_root: str | Path):
        self.uri = str(uri) if is_uri(uri) else str(Path(uri).expanduser().absolute())
        self.fs, root = open_uri(self.uri)
        self.root = root.rstrip("/")
        self.local_root = Path(local_root).expanduser().absolute()

    @classmethod
    def from_config(cls, config) -> RunStorage | None:
        """run.dir bound to run.storage (None without it); exports run.cache_max_gb to the Ray workers
        this driver starts (`rayalign.storage_cache`)."""
        if not config.run.storage:
            return None
        storage_cache.export_bound(config.run.cache_max_gb)
        return cls(config.run.storage, config.run.dir)

    def key(self, local: str | Path) -> str:
        """`local`'s path relative to run.dir; ValueError outside it."""
        relative = Path(local).expanduser().absolute().relative_to(self.local_root).as_posix()
        return "" if relative == "." else relative

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def fs_path(self, local: str | Path) -> str:
        """`local`'s path inside the storage filesystem (what pyarrow and Ray Train take with `fs`)."""
        return self._path(self.key(local))

    def location(self, local: str | Path) -> str:
        """The URI (or storage path) that code on any node reads `local` from."""
        return join(self.uri, self.key(local))

    def _is_file(self, key: str) -> bool:
        return self.fs.get_file_info(self._path(key)).type == _fs().FileType.File

    def exists(self, local: str | Path) -> bool:
        """A committed unit or a file is at `local`'s location."""
        key = self.key(local)
        return _read_marker(self.fs, self._path(key)) is not None or self._is_file(key)

    def publish(self, *paths: str | Path) -> None:
        """Copy files (one object each) and directories (units, marker last) to their locations."""
        for local in map(Path, paths):
            self._publish(local, self.key(local))

    def _publish(self, local: Path, key: str) -> None:
        path = self._path(key)
        if local.is_file():
            _upload(self.fs, local, path)
            return
        if not local.is_dir():
            raise FileNotFoundError(f"cannot publish {local}: it does not exist")
        self._open(path)
        self._commit(path, self._upload_files(path, local), local)

    # A unit written by several processes (the ranks of a DeepSpeed checkpoint, each on its own node): one
    # opens it, each uploads its own files, one commits the union of their names.
    def open_unit(self, local: str | Path) -> None:
        """Readers stop trusting the old copy at `local`'s location (its marker goes first); it is emptied."""
        self._open(self._path(self.key(local)))

    def upload_files(self, local: str | Path, source: str | Path | None = None) -> list[str]:
        """The files under `source` (default `local`) into `local`'s open unit; their relative names."""
        return self._upload_files(self._path(self.key(local)), Path(source or local))

    def commit_unit(self, local: str | Path, names: list[str]) -> None:
        """The marker, listing `names`: from now on readers trust the unit."""
        self._commit(self._path(self.key(local)), names, Path(local))

    def _open(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{path}/{MARKER}")
        self.fs.delete_dir_contents(path, missing_dir_ok=True)
        _write_object(self.fs, f"{path}/{UNIT}", b"")

    def _upload_files(self, path: str, source: Path) -> list[str]:
        names = []
        for file in _unit_files(source):
            names.append(file.relative_to(source).as_posix())
            _upload(self.fs, file, f"{path}/{names[-1]}")
        return names

    def _commit(self, path: str, names: list[str], local: Path) -> None:
        marker = {"id": uuid.uuid4().hex, "files": sorted(set(names))}
        _write_object(self.fs, f"{path}/{MARKER}", json.dumps(marker).encode())
        if local.is_dir():
            (local / MARKER).write_text(json.dumps(marker))  # the working copy knows which commit it holds

    def pull(self, local: str | Path) -> bool:
        """Copy what is committed at `local`'s location to `local` (atomically); False when nothing is."""
        local = Path(local)
        path = self._path(self.key(local))
        marker = _read_marker(self.fs, path)
        if marker:
            if local.is_dir() and (local / MARKER).is_file() and json.loads((local / MARKER).read_text()) == marker:
                return True
            with _atomic_local(local) as tmp:
                _copy_unit(self.fs, path, marker, tmp)
            return True
        if not self._is_file(self.key(local)):
            return False
        with _atomic_local(local) as tmp:
            _download(self.fs, path, tmp)
        return True

    def delete(self, local: str | Path) -> None:
        path = self._path(self.key(local))
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{path}/{MARKER}")
        info = self.fs.get_file_info(path)
        if info.type == _fs().FileType.File:
            self.fs.delete_file(path)
        elif info.type == _fs().FileType.Directory:
            self.fs.delete_dir(path)

    def committed_units(self, local_parent: str | Path) -> list[str]:
        """Names of the committed units directly under `local_parent`'s location."""
        path = self._path(self.key(local_parent))
        children = self.fs.get_file_info(_fs().FileSelector(path, allow_not_found=True))
        return sorted(c.base_name for c in children
                      if c.type == _fs().FileType.Directory and _read_marker(self.fs, c.path) is not None)

    def remote(self, path: str) -> str:
        """Where code on other nodes reads the model or file `path` the driver holds.

        A URI stays; a name that is no local path is a hub id every node resolves itself; a path in
        run.dir maps to its location (published if it is not there yet); any other local path is
        uploaded once into STORAGE/inputs/.
        """
        local = Path(path).expanduser()
        if is_uri(path) or not local.exists():
            return path
        local = local.absolute()
        if _is_local(self.fs) and local.is_relative_to(self.root):  # already a location in a local storage
            return str(local)
        try:
            key = self.key(local)
        except ValueError:
            key = f"inputs/{local.name}-{_hash(str(local))[:8]}"
        if _read_marker(self.fs, self._path(key)) is None and not self._is_file(key):
            self._publish(local, key)
        return join(self.uri, key)
