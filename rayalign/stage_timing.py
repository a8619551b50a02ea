"""Where an iteration's wall time goes: the timings the stages report and the loop's per-iteration breakdown.

- The Ray Data actors (`Generator`, `Judge`) stamp each output row with its share of the batch's seconds
  (`generate_seconds`, `judge_seconds`) and, on the first row after start-up, the actor's start-up
  (`actor_start_seconds`: loading its models); `pass_seconds` sums them for the loop, split into the
  iteration's prompts and the evaluation prompts (`pass_other`: the pass's wall time they leave out), and
  `drop_timing` removes them before any artifact is written.
- The training stage writes `timings.json` into its run dir: the driver's data loading and preparation
  (tokenization and reference scoring), the `TorchTrainer` fit, and the worker's start-up, steps and saves
  (`WORKER_FILE`, written by rank 0).
- `iteration_seconds` assembles one iteration's record: its sampling pass, training parts and the
  evaluation of its model (a share of the next pass), as `time/<stage>` keys for metrics.jsonl.

Actor seconds are busy time: in a streamed pass generation and judging overlap, so the parts of a pass
may add up to more than its wall time (`time/sample_pass`). No Ray, no torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

GENERATE, JUDGE, ACTOR_START = "generate_seconds", "judge_seconds", "actor_start_seconds"
TIMING_COLUMNS = (GENERATE, JUDGE, ACTOR_START)
WORKER_FILE = "worker_seconds.json"
TRAIN_FILE = "timings.json"
PASS_DIR = "timings"  # RUN_DIR/timings/pass-<model>.json: the pass that evaluated <model>, sampled with it
# The stacked bar's order: sampling (its start-up, generation, judging), training, then evaluation.
BAR_STAGES = ("actor_start", "generate", "judge", "pass_other", "prepare", "train_start", "train", "save",
              "evaluate")


class ActorClock:
    """An actor's start-up (from construction to `ready`) and per-batch seconds, as output columns."""

    def __init__(self):
        self.created, self.start_seconds = time.perf_counter(), 0.0

    def ready(self) -> None:
        self.start_seconds = time.perf_counter() - self.created

    def stamp(self, out: pd.DataFrame, column: str, began: float) -> pd.DataFrame:
        """`out` with its share of the batch's seconds per row, and the start-up on the first batch."""
        rows = max(1, len(out))
        out[column] = (time.perf_counter() - began) / rows
        start = [self.start_seconds] + [0.0] * (len(out) - 1)
        out[ACTOR_START] = (out[ACTOR_START] + start) if ACTOR_START in out else start
        self.start_seconds = 0.0
        return out


def drop_timing(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame])


def pass_seconds(rows: pd.DataFrame, is_eval, wall: float) -> dict:
    """One sampling pass: its wall time, the actors' start-up, and busy seconds per part."""
    def total(column: str, mask) -> float:
        return round(float(rows.loc[mask, column].sum()), 2) if column in rows else 0.0

    train = ~is_eval
    out = {"sample_pass": round(wall, 2), "actor_start": total(ACTOR_START, slice(None)),
           "generate": total(GENERATE, train), "judge": total(JUDGE, train),
           "evaluate": round(total(GENERATE, is_eval) + total(JUDGE, is_eval), 2)}
    # what the actors' own seconds leave out: Ray Data's scheduling and data movement, process start-up
    out["pass_other"] = round(max(0.0, wall - sum(v for k, v in out.items() if k != "sample_pass")), 2)
    return out


def train_seconds(*, load: float, prepare: float, fit: float, worker: dict) -> dict:
    """The training stage's parts: the driver's, and the worker's; `train_start` is the fit's remainder
    (Ray Train's start-up, the worker's model loading), never negative."""
    steps, save = worker.get("steps", 0.0), worker.get("save", 0.0)
    return {"load": round(load, 2), "prepare": round(prepare, 2), "fit": round(fit, 2),
            "train_start": round(max(0.0, fit - steps - save), 2), "train": round(steps, 2), "save": round(save, 2)}


def iteration_seconds(sampling: dict | None, training: dict | None, evaluation: dict | None) -> dict:
    """`time/*` keys of an iteration: the pass that sampled its data (none for iteration 0), its training,
    and the evaluation share of the pass that evaluated its model. Missing parts (a run resumed from an older
    version) are left out."""
    out = {}
    if sampling:
        out.update({k: sampling[k] for k in ("sample_pass", "actor_start", "generate", "judge", "pass_other")
                    if k in sampling})
    if training:
        out["prepare"] = round(training["load"] + training["prepare"], 2)
        out.update({k: training[k] for k in ("train_start", "train", "save")})
    if evaluation:
        out["evaluate"] = evaluation["evaluate"]
    return {f"time/{k}": v for k, v in out.items()}


def pass_file(run_dir: Path, evaluated: str) -> Path:
    return run_dir / PASS_DIR / f"pass-{evaluated}.json"


def read_iteration_seconds(run_dir: Path, iteration: int) -> dict:
    """`iteration_seconds` from the stored timings of loop iteration `iteration` (absent files: left out)."""
    def read(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.exists() else None

    sampling = read(pass_file(run_dir, f"iter-{iteration - 1}")) if iteration > 0 else None
    return iteration_seconds(sampling, read(run_dir / f"iter-{iteration}" / "train" / TRAIN_FILE),
                             read(pass_file(run_dir, f"iter-{iteration}")))


def stage_line(seconds: dict) -> str:
    """`time/*` keys as one log line: "generate 12.3 s, judge 4.5 s, ..."."""
    return ", ".join(f"{k.removeprefix('time/')} {v:.1f} s" for k, v in seconds.items())
