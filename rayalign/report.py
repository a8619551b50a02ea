"""`RUN_DIR/report.md` and PNG plots from the loop's `metrics.jsonl` and each iteration's training log.

Plots: win rates and gold reward per iteration, judge accuracy and KL per iteration, and the training
loss and reward margins of every iteration's update, step by step. Matplotlib with the Agg backend; no
computation beyond reading the logs.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.io import atomic_write_text
from rayalign.metrics_log import read_jsonl

COLUMNS = ("iteration", "pairs", "win_rate_vs_sft", "win_rate_vs_prev", "gold_reward_mean", "judge_accuracy",
           "kl_to_ref", "train_loss", "seconds")


def _fmt(value) -> str:
    return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))


def _plot(run_dir: Path, records: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots, iterations = run_dir / "plots", [r["iteration"] for r in records]
    plots.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for key in ("win_rate_vs_sft", "win_rate_vs_prev"):
        axes[0].plot(iterations, [r.get(key) for r in records], marker="o", label=key)
    axes[0].set(title="win rate (gold reward)", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(iterations, [r.get("gold_reward_mean") for r in records], marker="o", color="tab:green")
    axes[1].set(title="mean gold reward of samples")
    axes[2].plot(iterations, [r.get("judge_accuracy") for r in records], marker="o", color="tab:purple")
    axes[2].set(title="judge accuracy (self-judged vs gold)", ylim=(0, 1))
    axes[3].plot(iterations, [r.get("kl_to_ref") for r in records], marker="s", color="tab:orange")
    axes[3].set(title="KL to pi_SFT (nats per sample)")
    for ax in axes:
        ax.set(xlabel="iteration", xticks=iterations)
    for ax in axes[:3:2]:
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    fig.tight_layout()
    paths = [plots / "iterations.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
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
    paths.append(plots / "training.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def write_report(run_dir: Path) -> Path:
    records = read_jsonl(run_dir / "metrics.jsonl")
    plots = _plot(run_dir, records)
    lines = ["# rayalign run report", "", f"Run directory: `{run_dir}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in records]
    lines += ["", "Iteration 0 is DPO on the gold-labelled seed pairs; later iterations train on pairs the",
              "previous model judged itself. Win rates compare gold rewards on held-out prompts (ties = 1/2).", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
