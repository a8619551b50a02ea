"""SPA with and without self-refinement on the quickstart loop: judge accuracy and win rate, a few seeds.

SPA (Kim et al., ICLR 2025; ALGORITHMS.md §5) trains each iteration on pairs the previous model judged
itself, and its self-refinement softens the labels of the pairs a de-coupled model is least confident
about (label smoothing alpha = 0.1 on the ~10% lowest margins, after a 20% warm start). Here both arms run
`configs/quickstart.yaml` through `rayalign.loop.run_loop`, differing only in `spa.refine`:
  refine      spa.refine=true (the quickstart)
  no_refine   spa.refine=false (plain iterative DPO on the self-judged pairs)
Per seed, data.seed, train.seed and generate.seed are the seed. Self-refinement only acts inside the
updates of iterations 1-3, so both arms share pi_SFT, pi_0 and pi_0's judged samples: those are computed
once per seed and copied into the other arm's run directory, where the loop's resume logic skips them
(so iteration 1's judge accuracy is the same number in both arms by construction).

Run from the repository root:  python -m experiments.spa_ablation [--seeds 0 1 2] [key=value ...]
About 8-10 minutes per seed on this 2-core machine (a full quickstart plus the second arm's last three
iterations); the three default seeds took 31 minutes with other jobs running beside them.
Writes runs/experiments/spa_ablation/{<arm>-seed<s>/, results.json, spa_ablation.png} and prints per arm
the judge accuracy of every self-judged iteration and the win rate against pi_SFT of every model (mean,
standard deviation and range over seeds), with the per-seed values.
Not here: no training or judging code of its own; everything runs through the loop and its config.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from experiments.loop_arms import run_arms

ARMS = {"refine": "spa.refine=true", "no_refine": "spa.refine=false"}
DEFAULT_OUT = Path("runs/experiments/spa_ablation")
# What both arms share (see the module docstring): setup, pi_0 and pi_0's judged samples of iteration 1.
SHARED = ("data", "tiny-model", "sft", "iter-0", "eval/sft.parquet", "eval/iter-0.parquet",
          "iter-1/samples.parquet", "iter-1/judged.parquet", "iter-1/judge_counts.json")


def arm_config(arm: str, seed: int, run_dir: Path, extra: list[str]):
    from rayalign.config_loader import load_config

    return load_config("configs/quickstart.yaml", [
        ARMS[arm], f"data.seed={seed}", f"train.seed={seed}", f"generate.seed={seed}", f"run.dir={run_dir}",
        *extra])


def _relabelled(run_dir: Path, iteration: int) -> int:
    """Pairs that self-refinement gave a soft label in the iteration's update (summed over its steps)."""
    log = run_dir / f"iter-{iteration}" / "train" / "metrics.jsonl"
    return sum(json.loads(line).get("spa/relabelled", 0) for line in log.read_text().splitlines() if line)


def _stats(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} [{min(values):.3f}, {max(values):.3f}]"


def table(results: dict) -> str:
    """Per arm: judge accuracy per self-judged iteration and the final model's numbers, over seeds."""
    lines = [f"{'arm':10} {'metric':28} {'mean ± sd [min, max] over seeds':36} per seed"]
    for arm in ARMS:
        runs = sorted((r for r in results.values() if r["arm"] == arm), key=lambda r: r["seed"])
        last = len(runs[0]["records"]) - 1
        rows = [(f"judge accuracy, iter {i}", [r["records"][i]["judge_accuracy"] for r in runs])
                for i in range(1, last + 1)]
        rows += [(f"pairs soft-labelled, iter {i}", [float(r["records"][i]["relabelled"]) for r in runs])
                 for i in range(1, last + 1)]
        rows += [(f"win vs SFT, iter {i}", [r["records"][i]["win_rate_vs_sft"] for r in runs])
                 for i in range(last + 1)]
        rows += [(f"gold reward, iter {last}", [r["records"][last]["gold_reward_mean"] for r in runs]),
                 (f"KL to SFT, iter {last}", [r["records"][last]["kl_to_ref"] for r in runs])]
        for name, values in rows:
            lines.append(f"{arm:10} {name:28} {_stats(values):36} " + " ".join(f"{v:.3f}" for v in values))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = (("judge_accuracy", "judge accuracy (self-judged vs gold)", 1),
              ("win_rate_vs_sft", "win rate vs pi_SFT (gold reward)", 0),
              ("gold_reward_mean", "mean gold reward of samples", 0))
    for ax, (key, title, start) in zip(axes, panels):
        for color, style, arm in zip(("C0", "C3"), ("-", "--"), ARMS):
            runs = [r for r in results.values() if r["arm"] == arm]
            iterations = list(range(start, len(runs[0]["records"])))
            for r in runs:  # each seed faintly, the mean over seeds bold
                ax.plot(iterations, [r["records"][i][key] for i in iterations], color=color, alpha=0.3, lw=1)
            mean = [statistics.mean(r["records"][i][key] for r in runs) for i in iterations]
            ax.plot(iterations, mean, color=color, ls=style, marker="o", lw=2,
                    label=f"{arm} (mean of {len(runs)} seeds)")
        ax.set(title=title, xlabel="iteration", xticks=iterations)
        ax.grid(alpha=0.3)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for both arms")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    def annotate(run_dir, record):
        record["relabelled"] = _relabelled(run_dir, record["iteration"]) if record["iteration"] else 0

    results = run_arms(ARMS, args.seeds, args.out, make_config=lambda arm, seed, run_dir: arm_config(
        arm, seed, run_dir, args.overrides), shared=SHARED, annotate=annotate, label="spa_ablation")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"spa_ablation: plot {plot(results, args.out / 'spa_ablation.png')}")


if __name__ == "__main__":
    main()
