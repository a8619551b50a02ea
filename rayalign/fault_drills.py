"""Fault drills for the training workers: kill or stall one worker at a chosen step, once per run directory.

Tests and the resume drills set RAYALIGN_KILL_WORKER_AT on the driver (`rayalign.train` hands it to the workers);
with it unset nothing here runs. It does not recover anything: Ray Train's restart and the checkpoints do.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def inject_fault(spec: str | None, step: int, rank: int, run_dir: Path) -> None:
    """Fault drills: spec "STEP:RANK[,STEP:RANK...]" (from RAYALIGN_KILL_WORKER_AT on the driver) SIGKILLs
    that worker process just before that step; "STEP:RANK:stall" hangs it there instead (a test then kills
    the whole command at a known point). Each fires once per run directory (a marker file prevents repeats)."""
    for item in filter(None, (spec or "").split(",")):
        parts = item.split(":")
        if tuple(map(int, parts[:2])) != (step, rank):
            continue
        stall = parts[2:] == ["stall"]
        marker = run_dir / f".{'stalled' if stall else 'killed'}-step{step}-rank{rank}"
        if marker.exists():
            continue
        marker.touch()
        while stall:
            time.sleep(60)
        os.kill(os.getpid(), signal.SIGKILL)
