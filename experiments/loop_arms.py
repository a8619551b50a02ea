"""Run several arms of the quickstart loop per seed, sharing what every arm computes identically.

The first arm of a seed runs the whole loop; later arms start from a copy of its shared stages (setup,
pi_0, and whatever else the caller lists) and the loop resumes past them. Used by
`spa_ablation`; it does not build tables or plots.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path


def copy_shared(source: Path, target: Path, shared: tuple[str, ...]) -> None:
    """Seed `target` with the `shared` run-dir entries of `source` (the loop resumes past them)."""
    for name in shared:
        src, dst = source / name, target / name
        if dst.exists() or not src.exists():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def run_arms(arms, seeds, out: Path, *, make_config: Callable, shared: tuple[str, ...],
             annotate: Callable[[Path, dict], None], label: str) -> dict:
    """{f"{arm}-seed{seed}": {arm, seed, records, seconds}}; `make_config(arm, seed, run_dir)` gives each run's
    Config and `annotate(run_dir, record)` adds per-iteration fields to its metrics records."""
    from rayalign.loop import run_loop

    results = {}
    for seed in seeds:
        first = None
        for arm in arms:
            run_dir = out / f"{arm}-seed{seed}"
            if first is not None:
                copy_shared(first, run_dir, shared)
            started = time.perf_counter()
            if run_loop(make_config(arm, seed, run_dir), resume=True) != 0:
                raise RuntimeError(f"{run_dir}: the loop failed")
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            for record in records:
                annotate(run_dir, record)
            results[f"{arm}-seed{seed}"] = {"arm": arm, "seed": seed, "records": records,
                                            "seconds": round(time.perf_counter() - started, 1)}
            print(f"{label}: {arm} seed {seed} done in {time.perf_counter() - started:.0f} s", flush=True)
            first = first or run_dir
    return results
