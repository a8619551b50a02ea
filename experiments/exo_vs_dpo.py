"""EXO-rw vs DPO (and DPO-rw) on the quickstart task with K = 4 samples: gold reward vs KL to the reference.

The EXO paper (Ji et al., ICML 2024; ALGORITHMS.md §4) claims that EXO's reverse KL to the reward's
distribution over K samples reaches a better reward-KL frontier than DPO's forward KL. Here each arm runs
the iterative loop of `configs/quickstart.yaml` (`rayalign.loop.run_loop`) with generate.num_samples=4
and loop.rewards=gold: every iteration samples K = 4 reviews per prompt from the previous model and
labels them with the task's gold reward (positive minus negative lexicon words), so the arms differ only
in the loss:
  dpo      pairs: the best vs the worst of the 4 samples by gold reward
  exo_rw   all 4 samples, target softmax(r / beta_r), reverse KL
  dpo_rw   all 4 samples, the same target, forward KL (the EXO paper's DPO baseline on K samples)
SPA's self-refinement is off (it de-noises self-judged labels; these are gold). Iteration 0 is DPO on the
gold seed pairs for every arm (a K-sample loss cannot train on pairs), so the arms share pi_SFT, pi_0 and
pi_0's samples: they are computed once per seed and copied into the other arms' run directories, where the
loop's resume logic skips them. Each model pi_0..pi_3 is one point: x = KL(pi || pi_SFT) estimated on its own
samples of the 64 held-out prompts, y = their mean gold reward.

Run from the repository root:  python -m experiments.exo_vs_dpo [--seeds 0 1] [--arms dpo exo_rw dpo_rw]
Writes runs/experiments/exo_vs_dpo/{<arm>-seed<s>/, results.json, frontier.png} and prints the table.
Not here: no new training code; everything runs through the loop and its configs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.loop_arms import run_arms

ARMS = ("dpo", "exo_rw", "dpo_rw")
DEFAULT_OUT = Path("runs/experiments/exo_vs_dpo")
# What every arm shares (see the module docstring): setup, pi_0 and pi_0's judged samples of iteration 1.
SHARED = ("data", "tiny-model", "sft", "iter-0", "eval/sft.parquet", "eval/iter-0.parquet",
          "iter-1/samples.parquet", "iter-1/judged.parquet", "iter-1/judge_counts.json")


def arm_config(arm: str, seed: int, run_dir: Path, *, beta_r: float, iterations: int, extra: list[str]):
    from rayalign.config_loader import load_config

    return load_config("configs/quickstart.yaml", [
        f"loss.type={arm}", f"loss.beta_r={beta_r}", "generate.num_samples=4", "loop.rewards=gold",
        "spa.refine=false", f"loop.iterations={iterations}", f"train.seed={seed}", f"data.seed={seed}",
        f"generate.seed={seed}", f"run.dir={run_dir}", *extra])


def _train_examples(run_dir: Path, iteration: int) -> int:
    """Rows the iteration trained on (pairs or groups), from its prepared training split."""
    import pandas as pd

    return len(pd.read_parquet(run_dir / f"iter-{iteration}" / "train" / "prepared" / "train.parquet"))


def table(results: dict, arms) -> str:
    """Per arm and iteration: mean over seeds (and the per-seed values) of gold reward and KL."""
    lines = [f"{'arm':8} {'iter':>4} {'gold reward':>12} {'KL to SFT':>10} {'win vs SFT':>10} {'examples':>8}   "
             "per seed (gold reward / KL)"]
    for arm in arms:
        runs = [r for r in results.values() if r["arm"] == arm]
        for i in range(len(runs[0]["records"])):
            rows = [r["records"][i] for r in runs]
            mean = {k: sum(r[k] for r in rows) / len(rows)
                    for k in ("gold_reward_mean", "kl_to_ref", "win_rate_vs_sft", "train_examples")}
            seeds = "  ".join(f"{r['gold_reward_mean']:+.3f}/{r['kl_to_ref']:.2f}" for r in rows)
            lines.append(f"{arm:8} {i:>4} {mean['gold_reward_mean']:>+12.3f} {mean['kl_to_ref']:>10.3f} "
                         f"{mean['win_rate_vs_sft']:>10.3f} {mean['train_examples']:>8.0f}   {seeds}")
    return "\n".join(lines)


def plot(results: dict, arms, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for color, arm in zip(("C0", "C3", "C2"), arms):
        runs = [r for r in results.values() if r["arm"] == arm]
        for r in runs:  # each seed faintly, the mean over seeds bold
            ax.plot([x["kl_to_ref"] for x in r["records"]], [x["gold_reward_mean"] for x in r["records"]],
                    color=color, alpha=0.3, marker=".", linewidth=1)
        count = len(runs[0]["records"])
        kl = [sum(r["records"][i]["kl_to_ref"] for r in runs) / len(runs) for i in range(count)]
        gold = [sum(r["records"][i]["gold_reward_mean"] for r in runs) / len(runs) for i in range(count)]
        ax.plot(kl, gold, color=color, marker="o", linewidth=2, label=f"{arm} (mean of {len(runs)} seeds)")
        for i, (x, y) in enumerate(zip(kl, gold)):
            ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
    ax.set(xlabel="KL(pi || pi_SFT), nats per completion", ylabel="mean gold reward (held-out prompts)",
           title="quickstart, K = 4 gold-labelled samples: reward vs KL (labels: iteration)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--beta-r", type=float, default=1.0,
                        help="reward temperature of exo_rw/dpo_rw; the gold rewards are integer word counts")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for every arm")
    args = parser.parse_args()
    args.out = args.out.resolve()  # Ray Train workers do not run in this directory: relative paths break
    args.out.mkdir(parents=True, exist_ok=True)
    def make_config(arm, seed, run_dir):
        return arm_config(arm, seed, run_dir, beta_r=args.beta_r, iterations=args.iterations, extra=args.overrides)

    def annotate(run_dir, record):
        record["train_examples"] = _train_examples(run_dir, record["iteration"])

    results = run_arms(args.arms, args.seeds, args.out, make_config=make_config, shared=SHARED, annotate=annotate,
                       label="exo_vs_dpo")
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results, args.arms))
    print(f"exo_vs_dpo: plot {plot(results, args.arms, args.out / 'frontier.png')}")


if __name__ == "__main__":
    main()
