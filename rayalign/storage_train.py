"""Run storage for the training stage (`rayalign.train`, `rayalign.train_loop`); see `rayalign.storage`.

With `run.storage` the driver publishes the prepared Parquet and hands the workers storage locations of
it and of the models; each worker materializes them on its node and runs in a node-local scratch run dir
bound to the stage's location (STORAGE/<stage>), one per node and attempt. Rank 0 publishes metrics.jsonl
and tb/ with every checkpoint, then the checkpoint (a unit, so a resume on any node finds only complete
ones; with DeepSpeed every node uploads its ranks' shards into it before rank 0 commits it); at the end
metrics, final_metrics.json and tb/, then final/ last: the stage's completion marker.
After `fit()` the driver pulls those into its run.dir. Without `run.storage` nothing here is called.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from rayalign.checkpoint import barrier
from rayalign.stage_timing import WORKER_FILE
from rayalign.storage import RunStorage, _hash, node_cache_dir

LOGS = ("metrics.jsonl", "final_metrics.json", "tb", WORKER_FILE)
OUTPUTS = ("FAILED.json", *LOGS, "final")  # what the driver pulls after fit(), final/ last


def latest_stored_checkpoint(store: RunStorage, run_dir: str | Path) -> Path | None:
    """run_dir/checkpoints/step-N of the newest committed checkpoint in storage (not downloaded)."""
    from rayalign.checkpoint import STEP_DIR

    checkpoints = Path(run_dir) / "checkpoints"
    steps = [int(m.group(1)) for name in store.committed_units(checkpoints) if (m := STEP_DIR.match(name))]
    return checkpoints / f"step-{max(steps)}" if steps else None


def worker_paths(store: RunStorage, paths: dict, run_dir: Path) -> dict:
    """Publish the prepared Parquet; the workers' storage locations of their inputs and their stage."""
    prepared = {k: v for k, v in paths.items() if k in ("train_path", "eval_path")}
    store.publish(*prepared.values())
    return {**{k: store.remote(v) for k, v in prepared.items()}, "storage_dir": store.location(run_dir),
            "attempt": uuid.uuid4().hex}


def ray_storage(paths: dict, run_dir: Path) -> dict:
    """RunConfig's storage arguments: Ray Train's run state in STORAGE/<stage>/ray, else RUN_DIR/ray."""
    if not paths.get("storage_dir"):
        return {"storage_path": str(run_dir.resolve() / "ray")}
    store = RunStorage(paths["storage_dir"], run_dir)
    return {"storage_path": store.fs_path(run_dir / "ray"), "storage_filesystem": store.fs}


def worker_storage(loop_config: dict, *, rank: int) -> RunStorage | None:
    """A worker's scratch run dir bound to its stage's location; rank 0 continues the stored logs."""
    location = loop_config.get("storage_dir")
    if not location:
        return None
    store = RunStorage(location, node_cache_dir() / "train" / _hash(location + loop_config["attempt"]))
    store.local_root.mkdir(parents=True, exist_ok=True)
    if rank == 0:  # MetricsLog then truncates them to the checkpoint it resumes from
        for name in ("metrics.jsonl", "tb"):
            store.pull(store.local_root / name)
    return store


def resume_checkpoint(store: RunStorage) -> Path | None:
    """The newest committed checkpoint, materialized on this node (None: start fresh)."""
    from rayalign.storage import materialize

    latest = latest_stored_checkpoint(store, store.local_root)
    return Path(materialize(store.location(latest))) if latest else None


def publish_checkpoint(store: RunStorage, checkpoint: Path, scratch: Path, *, keep: int, rank: int,
                       node_leader: bool) -> None:
    """Collective, after `rayalign.checkpoint.commit`: rank 0 publishes the logs and opens the checkpoint's
    unit; the first rank of every node (`node_leader`) uploads what its node holds of it (rank 0's node: the committed
    `checkpoint`; another node: the shards its ranks wrote into `scratch`, the temporary directory, removed
    afterwards: nodes share no disk); rank 0 commits the union of the names, then drops stored checkpoints
    beyond `keep` (0: keep all). DDP's rank 0 holds everything; DeepSpeed's ranks each hold their shards."""
    if rank == 0:
        store.publish(*_present(store, ("metrics.jsonl", "tb")))
        store.open_unit(checkpoint)
    barrier()
    names: list[str] = []
    if node_leader:
        source = checkpoint if checkpoint.is_dir() else scratch
        names = store.upload_files(checkpoint, source) if source.is_dir() else []
    everyone = _gather(names)
    if rank == 0:
        store.commit_unit(checkpoint, [name for part in everyone for name in part])
        if keep > 0:
            _drop_old_checkpoints(store, checkpoint.parent, keep)
    barrier()
    if node_leader and not checkpoint.is_dir():
        shutil.rmtree(scratch, ignore_errors=True)


def _drop_old_checkpoints(store: RunStorage, checkpoints: Path, keep: int) -> None:
    from rayalign.checkpoint import STEP_DIR

    names = store.committed_units(checkpoints)
    steps = sorted(int(m.group(1)) for name in names if (m := STEP_DIR.match(name)))
    for step in steps[:-keep]:
        store.delete(checkpoints / f"step-{step}")


def first_rank_on_node(rank: int) -> bool:
    """Collective: whether `rank` is the lowest rank on its Ray node. Not Ray Train's local rank: that counts
    the ranks per node IP address, and Ray nodes can share one (several raylets on a machine, as in tests)."""
    if _one_process():
        return rank == 0  # no need to ask Ray (which would start it in Ray Train's local mode)
    import ray

    node = ray.get_runtime_context().get_node_id()
    return _gather(node).index(node) == rank


def _one_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1


def _gather(value):
    """Every rank's `value`, in rank order (on every rank); just ours outside a process group."""
    import torch.distributed as dist

    if _one_process():
        return [value]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def publish_outputs(store: RunStorage) -> None:
    """Rank 0 at the end: the logs, then final/ (the stage's completion marker) last; then the scratch
    (checkpoints and final/, now in storage) is removed from the node's disk."""
    store.publish(*_present(store, (*LOGS, "final")))
    shutil.rmtree(store.local_root, ignore_errors=True)


def publish_failure(store: RunStorage, failure: Path) -> None:
    store.publish(failure)


def pull_outputs(store: RunStorage, run_dir: Path) -> None:
    """Driver after fit(): the stage's outputs from storage into run.dir."""
    for name in OUTPUTS:
        store.pull(run_dir / name)


def _present(store: RunStorage, names) -> list[Path]:
    return [store.local_root / n for n in names if (store.local_root / n).exists()]
