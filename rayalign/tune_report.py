"""A finished (or resumed) sweep's outputs under RUN_DIR/tune/:

    results.csv   one row per trial: swept values, final and best metric, status, trial dir
    results.md    the same, sorted best first
    final_metric.png, learning_curves.png
    best.yaml     the best trial's complete config (by final metric); `rayalign train|run best.yaml` take it

Metrics are read from each trial's own run dir (`metrics.jsonl`, `final_metrics.json`), which a resumed
trial keeps as one uninterrupted run; Ray Tune supplies only each trial's name and whether it failed.
Statuses: TERMINATED (trained to the end), STOPPED (ended early: the scheduler stopped it, or the sweep was
interrupted; `final` is then its last evaluation), ERROR.
Every file is written atomically. Nothing here trains or starts Ray.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Any

from rayalign.config import Config, TuneConfig
from rayalign.config_loader import dump_config, load_config
from rayalign.io import atomic_write_text
from rayalign.metrics_log import read_jsonl
from rayalign.tune_space import Dimension, value_of


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    name: str
    params: dict[str, Any]  # swept key -> the typed value the trial trained with
    status: str
    run_dir: Path
    curve: tuple[tuple[int, float], ...]  # (step, metric) at every evaluation, the final one last

    @property
    def final(self) -> float:
        return self.curve[-1][1] if self.curve else math.nan

    def best(self, mode: str) -> tuple[int | None, float]:
        """(step, value) of the best evaluation of the trial."""
        if not self.curve:
            return None, math.nan
        pick = max if mode == "max" else min
        return pick(self.curve, key=lambda point: point[1])


def read_curve(run_dir: Path, metric: str) -> tuple[tuple[int, float], ...]:
    """The metric at every evaluation of a train run dir, in step order; the final evaluation last."""
    points: dict[int, float] = {}
    log = run_dir / "metrics.jsonl"
    for record in read_jsonl(log) if log.exists() else ():  # a killed trial may have a torn last line
        if metric in record:
            points[record["step"]] = record[metric]
    final = run_dir / "final_metrics.json"
    if final.exists():
        record = json.loads(final.read_text())
        points[record["step"]] = record[metric]
    return tuple(sorted(points.items()))


def record_trial(name: str, run_dir: Path, dims: list[Dimension], metric: str, *, failed: bool,
                 fallback_params: dict) -> TrialRecord:
    """One trial's record from its run dir (its config.yaml has the typed values it trained with)."""
    config_file = run_dir / "config.yaml"
    if config_file.exists():
        config = load_config(config_file)
        params = {d.key: value_of(config, d.key) for d in dims}
    else:  # failed before its run dir was made
        params = {d.key: fallback_params.get(d.key) for d in dims}
    status = "ERROR" if failed else "TERMINATED" if (run_dir / "final_metrics.json").exists() else "STOPPED"
    return TrialRecord(name, params, status, run_dir, read_curve(run_dir, metric))


def collect_trials(results, dims: list[Dimension], tune_dir: Path, metric: str) -> list[TrialRecord]:
    """Records of every trial of a Ray Tune ResultGrid, in trial-name order."""
    records = []
    for result in results:
        name = Path(result.path).name  # trial_dirname_creator made Tune's trial dir name the trial name
        records.append(record_trial(name, tune_dir / "trials" / name, dims, metric,
                                    failed=result.error is not None, fallback_params=result.config or {}))
    return sorted(records, key=lambda r: r.name)


def ranked(trials: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best final metric first; trials without one last."""
    sign = -1.0 if mode == "max" else 1.0
    return sorted(trials, key=lambda t: (math.isnan(t.final), sign * t.final if not math.isnan(t.final) else 0))


def _columns(metric: str) -> list[str]:
    return [f"final {metric}", f"best {metric}", "best step", "status", "trial dir"]


def _row(trial: TrialRecord, mode: str) -> list:
    step, best = trial.best(mode)
    return [trial.name, *trial.params.values(), trial.final, best, step if step is not None else "", trial.status,
            str(trial.run_dir)]


def results_csv(trials: list[TrialRecord], tune: TuneConfig) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", *(trials[0].params if trials else ()), *_columns(tune.metric)])
    for trial in trials:
        writer.writerow(_row(trial, tune.mode))
    return out.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def results_markdown(trials: list[TrialRecord], tune: TuneConfig) -> str:
    """The trials as a Markdown table, best final metric first."""
    header = ["rank", "trial", *(trials[0].params if trials else ()), *_columns(tune.metric)[:-1]]
    lines = [f"# Sweep results: {tune.metric} ({tune.mode}), best first", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, trial in enumerate(ranked(trials, tune.mode), start=1):
        lines.append("| " + " | ".join(_cell(v) for v in [rank, *_row(trial, tune.mode)[:-1]]) + " |")
    return "\n".join(lines) + "\n"


def _label(trial: TrialRecord) -> str:
    return ", ".join(f"{key.split('.')[-1]}={_cell(value)}" for key, value in trial.params.items())


def _save_png(figure, path: Path) -> None:
    """savefig to a temporary sibling, then rename: readers never see half a PNG."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_trials(trials: list[TrialRecord], tune: TuneConfig, tune_dir: Path) -> list[Path]:
    """final_metric.png (a bar per trial, best on top) and learning_curves.png (metric vs step per trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ranked(trials, tune.mode)[::-1]
    finals = [t.final for t in order if not math.isnan(t.final)]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.35 * len(order)))
    ax.barh([_label(t) for t in order], [0.0 if math.isnan(t.final) else t.final for t in order])
    for y, trial in enumerate(order):
        ax.annotate(_cell(trial.final), (0 if math.isnan(trial.final) else trial.final, y), xytext=(3, 0),
                    textcoords="offset points", va="center", fontsize=8)
    if finals:  # zoom on the spread: trials often differ in the second decimal
        low, high = min(finals), max(finals)
        pad = max(high - low, abs(high) * 0.02, 1e-6)
        ax.set_xlim(low - pad, high + pad)
    ax.set_xlabel(f"final {tune.metric}")
    ax.set_title(f"{len(trials)} trials ({tune.mode} is best)")
    paths = [tune_dir / "final_metric.png", tune_dir / "learning_curves.png"]
    _save_png(fig, paths[0])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab20")
    for i, trial in enumerate(trials):
        if trial.curve:
            steps, values = zip(*trial.curve)
            ax.plot(steps, values, marker="o", markersize=3, color=colors(i % 20), label=_label(trial))
    ax.set_xlabel("step")
    ax.set_ylabel(tune.metric)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save_png(fig, paths[1])
    plt.close(fig)
    return paths


def best_config(trial: TrialRecord) -> Config:
    """The best trial's config with run.dir and run.storage unset (they were the trial's own), so that
    `rayalign train best.yaml` starts a fresh run dir."""
    config = load_config(trial.run_dir / "config.yaml")
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=None, storage=None))


def write_reports(tune_dir: Path, trials: list[TrialRecord], tune: TuneConfig) -> list[Path]:
    """Write every output file; returns their paths (no best.yaml when no trial has the metric)."""
    paths = [atomic_write_text(tune_dir / "results.csv", results_csv(trials, tune)),
             atomic_write_text(tune_dir / "results.md", results_markdown(trials, tune)),
             *plot_trials(trials, tune, tune_dir)]
    best = ranked(trials, tune.mode)[0] if trials else None
    if best is None or math.isnan(best.final):
        print("rayalign tune: no trial reported the metric; no best.yaml", flush=True)
        return paths
    header = (f"# The best trial of the sweep in {tune_dir.parent}: {best.name}, final {tune.metric} "
              f"{best.final:.4f} ({tune.mode}).\n# A complete config (trained in {best.run_dir}); run.dir and "
              "run.storage are unset:\n#   rayalign train best.yaml run.dir=runs/best\n")
    paths.append(atomic_write_text(tune_dir / "best.yaml", header + dump_config(best_config(best))))
    print(f"rayalign tune: best {best.name} ({_label(best)}): final {tune.metric} {best.final:.4f}; wrote "
          f"{', '.join(p.name for p in paths)} in {tune_dir}", flush=True)
    return paths
