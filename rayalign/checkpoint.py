"""Training checkpoints: `RUN_DIR/checkpoints/step-N/`, written atomically by a group of workers.

A checkpoint is a normal HF directory (model + tokenizer, loadable with `from_pretrained`; with `model.lora`
the adapters instead of the model, see `rayalign.lora`) plus what a resume needs: `trainer_state.json`
(step, epoch, data position, metrics) and the engine's optimizer and schedule state. All ranks write
into one temporary directory; after a barrier rank 0 renames it to its final name, so a directory named
`step-N` is always complete and a kill never leaves half of one.

Every `.pt` file of a checkpoint is read with `load_tensors` (`torch.load(weights_only=True)`): checkpoints
can come from shared storage, and a full unpickle would run whatever code a crafted file names.

It does not decide *when* to checkpoint (the trainer does) and knows nothing of Ray.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from rayalign.io import atomic_write_text

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects beyond tensors and plain containers: it is not loaded."""


def load_tensors(path: str | Path, *, map_location="cpu", allowed: tuple = ()):
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings and containers only, plus the
    classes in `allowed` (plain data types, e.g. DeepSpeed's loss-scaler record); anything else is refused."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1][:300]
        raise UnsafeCheckpointError(f"{path}: refused to load: it holds Python objects that a checkpoint written "
                                    f"by rayalign does not ({reason})") from None


def barrier() -> None:
    """torch.distributed's barrier inside a process group; nothing outside one (a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def begin(run_dir: str | Path, step: int, *, rank: int, node_leader: bool = False) -> Path:
    """Rank 0 and every `node_leader` (the first rank of its node: nodes need not share a disk) clear a stale
    temporary directory for `step`; every rank gets its path after a barrier."""
    tmp = Path(run_dir) / "checkpoints" / f".tmp-step-{step}"
    if rank == 0 or node_leader:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
    barrier()
    return tmp


def commit(tmp: Path, state: dict, *, rank: int, keep: int = 0) -> Path:
    """After every rank wrote into `tmp`: rank 0 writes the state file last and renames into place."""
    barrier()
    final = tmp.parent / f"step-{state['step']}"
    if rank == 0:
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if keep > 0:
            for old in complete_checkpoints(tmp.parent.parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final
