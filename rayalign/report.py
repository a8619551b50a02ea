"""`RUN_DIR/report.md` and PNG plots from the loop's `metrics.jsonl` and each iteration's training log.

Plots: per iteration, the gold reward's win rates and mean and the judge accuracy (a task with a gold
reward), KL to pi_SFT, with eval.reward_model that model's win rates and mean reward (the `rm/*` keys), and
with SamS the bandit's mean score of the judged pairs and its gap between right and wrong labels;
the training loss and reward margins of every iteration's update, step by step; and each iteration's
seconds per stage (`rayalign.stage_timing`), stacked. Matplotlib with the Agg
backend; no computation beyond reading the logs.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.io import atomic_write_text
from rayalign.metrics_log import read_jsonl

COLUMNS = ("iteration", "pairs", "win_rate_vs_sft", "win_rate_vs_prev", "gold_reward_mean", "judge_accuracy",
           "kl_to_ref", "train_loss", "seconds")
RM_COLUMNS = ("rm/win_rate_vs_sft", "rm/win_rate_vs_prev", "rm/reward_mean")  # with eval.reward_model
SAMS_COLUMNS = ("sams/score_mean", "sams/score_gap")  # sams.enabled: the bandit's scores of the judged pairs


def _columns(records: list[dict]) -> tuple[str, ...]:
    """COLUMNS, with the reward model's after the gold ones and SamS's after the judge's when records have them."""
    columns = COLUMNS
    if any(key in r for r in records for key in RM_COLUMNS):
        at = columns.index("gold_reward_mean") + 1
        columns = (*columns[:at], *RM_COLUMNS, *columns[at:])
    if any(key in r for r in records for key in SAMS_COLUMNS):
        at = columns.index("judge_accuracy") + 1
        columns = (*columns[:at], *SAMS_COLUMNS, *columns[at:])
    return columns


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _line(ax, records: list[dict], keys: tuple[str, ...], title: str, **style) -> None:
    iterations = [r["iteration"] for r in records]
    for key in keys:
        ax.plot(iterations, [r.get(key) for r in records], marker="o", label=key, **style)
    ax.set(title=title, xlabel="iteration", xticks=iterations)
    if len(keys) > 1:
        ax.legend()


def _plot_iterations(plt, path: Path, records: list[dict]) -> Path:
    gold = [  # (keys, title, style, a rate in [0, 1] with its 0.5 line); a task with a gold reward only
        (("win_rate_vs_sft", "win_rate_vs_prev"), "win rate (gold reward)", {}, True),
        (("gold_reward_mean",), "mean gold reward of samples", {"color": "tab:green"}, False),
        (("judge_accuracy",), "judge accuracy (judged pairs vs gold)", {"color": "tab:purple"}, True)]
    panels = list(gold) if any("gold_reward_mean" in r for r in records) else []
    panels.append((("kl_to_ref",), "KL to pi_SFT (nats per sample)", {"color": "tab:orange"}, False))
    if any(key in r for r in records for key in RM_COLUMNS):
        panels += [(RM_COLUMNS[:2], "win rate (eval.reward_model)", {}, True),
                   (RM_COLUMNS[2:], "mean reward of samples (eval.reward_model)", {"color": "tab:brown"}, False)]
    if any(key in r for r in records for key in SAMS_COLUMNS):
        panels.append((SAMS_COLUMNS, "SamS score of judged pairs (gap: right - wrong labels)", {}, False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (keys, title, style, rate) in zip(axes[0], panels):
        _line(ax, records, keys, title, **style)
        if rate:
            ax.set(ylim=(0, 1))
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_training(plt, run_dir: Path, path: Path, records: list[dict]) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in records:
        log = run_dir / f"iter-{r['iteration']}" / "train" / "metrics.jsonl"
        steps = read_jsonl(log) if log.exists() else []
        axes[0].plot([s["step"] for s in steps], [s["loss"] for s in steps], label=f"iter {r['iteration']}")
        axes[1].plot([s["step"] for s in steps], [s["rewards/margins"] for s in steps], label=f"iter {r['iteration']}")
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="reward margin (beta * log-ratio)", xlabel="step")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_stage_times(plt, path: Path, records: list[dict]) -> Path:
    """Stacked bars: each iteration's seconds per stage (`rayalign.stage_timing.BAR_STAGES`)."""
    from rayalign.stage_timing import BAR_STAGES

    iterations = [r["iteration"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(records)
    for stage in BAR_STAGES:
        values = [float(r.get(f"time/{stage}") or 0.0) for r in records]
        if any(values):
            ax.bar(iterations, values, bottom=bottom, label=stage)
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(iterations, [r.get("seconds") for r in records], "k_", markersize=30, label="iteration wall time")
    ax.set(title="seconds per stage (actor busy time; evaluate: the next pass)", xlabel="iteration",
           ylabel="seconds", xticks=iterations)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot(run_dir: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    return [_plot_iterations(plt, plots / "iterations.png", records),
            _plot_training(plt, run_dir, plots / "training.png", records),
            _plot_stage_times(plt, plots / "stage_times.png", records)]


def write_report(run_dir: Path) -> Path:
    records = read_jsonl(run_dir / "metrics.jsonl")
    plots, columns = _plot(run_dir, records), _columns(records)
    lines = ["# rayalign run report", "", f"Run directory: `{run_dir}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in records]
    lines += ["", "Iteration 0 is DPO on the gold-labelled seed pairs; later iterations train on the judge's pairs",
              "(judge.type: the previous model's implicit reward, or a reward model). Win rates compare gold rewards",
              "on held-out prompts (ties = 1/2)."]
    lines += ["Seconds: the iteration's wall time (its sampling pass and training); the stage_times plot splits",
              "it into stages (`time/*` in metrics.jsonl: actor start-up, generation, judging, data preparation",
              "and reference scoring, training start-up, steps, saves) and adds the evaluation of its model."]
    if columns is not COLUMNS:
        lines += ["The rm/* columns are the same metrics by eval.reward_model's rewards (mean reward per prompt",
                  "over its samples, ties = 1/2)."]
    lines += [""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
