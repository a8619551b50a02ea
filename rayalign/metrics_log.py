"""Per-step training metrics: `RUN_DIR/metrics.jsonl`, `run.loggers` (TensorBoard under `RUN_DIR/tb/` by
default, W&B, MLflow: `rayalign.tracking`), a progress bar.

Only one process (training rank 0) writes; the others hold a disabled log. On resume the lines after the
checkpoint's step are dropped from `metrics.jsonl` (they describe work that is being redone), so the file
always reads as one uninterrupted run. It computes nothing.

`read_jsonl` is the one reader of these append-only logs (also the loop's per-iteration `metrics.jsonl`):
a kill during an append can leave a partial last line, which is dropped with one line on stderr; a
broken line anywhere else is not a torn append, and fails naming the file and line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rayalign.data.errors import WHOLE, DataValidationError, RowError
from rayalign.io import atomic_write_text


class CorruptLogError(DataValidationError):
    """A line other than the last of a JSON-lines log is not JSON (the CLI prints it as one data error)."""


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines log, tolerating a torn (partial) last line; see the module docstring."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if position < len(numbered) - 1:
                raise CorruptLogError([RowError(str(path), number, WHOLE, f"not valid JSON ({exc.msg}); only "
                                                "a partial last line is tolerated: repair or remove it")]) from None
            print(f"rayalign: {path}:{number}: dropped a partial last line (an interrupted append): "
                  f"{line[:80]!r}", file=sys.stderr, flush=True)
    return records


class MetricsLog:
    """tracking: where the metrics go besides metrics.jsonl (default: TensorBoard only); config: the resolved
    config (`config_to_dict`), logged with them."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, resume_step: int = 0,
                 tracking=None, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.trackers = self.bar = None
        if not enabled:
            return
        self._truncate_after(resume_step)
        from tqdm import tqdm

        from rayalign.tracking import Trackers, TrackingSettings

        # purge_step drops TensorBoard events from the redone steps, like the JSONL truncation above.
        self.trackers = Trackers(tracking or TrackingSettings(), tb_dir=Path(run_dir) / "tb", config=config,
                                 purge_step=resume_step + 1 if resume_step else None)
        self.bar = tqdm(total=total_steps, initial=resume_step, desc="train", unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [record for record in read_jsonl(self.path) if record["step"] <= step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        self.trackers.log(metrics, metrics["step"])
        self.bar.update(1)
        shown = {"loss": f"{metrics['loss']:.4f}", "acc": f"{metrics['rewards/accuracies']:.2f}"}
        if "eval/rewards/accuracies" in metrics:
            shown["eval_acc"] = f"{metrics['eval/rewards/accuracies']:.2f}"
        self.bar.set_postfix(shown)

    def close(self, final_metrics: dict) -> None:
        if not self.enabled:
            return
        self.trackers.log(final_metrics, final_metrics["step"])
        if len(final_metrics) > 1:
            atomic_write_text(self.path.with_name("final_metrics.json"), json.dumps(final_metrics, indent=2) + "\n")
        self.trackers.close()
        self.bar.close()
