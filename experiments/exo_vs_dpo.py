"""EXO vs DPO on the reward-KL frontier: the quickstart's sentiment task, K = 4 gold-labelled samples per prompt.

The EXO paper (Ji et al., ICML 2024; ALGORITHMS.md §4) claims that EXO's reverse KL to the reward's
distribution over K samples reaches more reward than DPO's forward KL at the same KL to the SFT policy. Its
IMDB setting, at tiny-model size: one SFT'd tiny Llama (`rayalign.loop.build_task_sft`, the quickstart's SFT)
is pi_SFT and the reference. Per seed s, --prompts training prompts get K = 4 completions sampled from pi_SFT
at temperature 0.8 (top-p 1), each labelled by the task's gold reward (positive minus negative lexicon
words). Three arms train from pi_SFT on exactly these samples, with the logits divided by the logit
temperature 0.8 in training (`loss.logit_temperature`, as the authors' code does), AdamW at --lr, the same
number of optimizer steps and the same prompts in every step:
  dpo      DPO on every pair of a prompt's K samples with different gold rewards (the higher one chosen):
           all the information of the K samples as pairs; a step's batch is (pairs / steps) pairs, so it
           takes the same optimizer steps over the same samples (and ~2.5x the other arms' sequence passes)
  dpo_rw   the forward KL to the target softmax(r / beta_r) over the K samples (the paper's DPO baseline)
  exo_rw   EXO: the reverse KL to the same target
For each beta (DPO's beta, the K-sample losses' beta_pi; beta_r = --beta-r) in --betas, every --eval-every
steps the live policy is measured on --eval-prompts held-out prompts, 4 samples each at temperature 0.8:
mean gold reward and KL(pi || pi_SFT), both of the temperature-0.8 distributions that sampled them (the k1
estimate: mean over samples of log pi(y) - log pi_SFT(y), both with logits / 0.8). Each (beta, step) is a
point; an arm's frontier in one seed is its Pareto front of those points plus pi_SFT's (0, r_SFT), and the
comparison is the reward each front reaches at the KL budgets --kl-budgets (linear between front points,
flat after the best one; a budget beyond every KL the arm reached counts as not reached), mean ± s.e. over
seeds and paired by seed (KL estimates of a policy close to pi_SFT can be slightly negative: sampling noise).

Run from the repository root:  OMP_NUM_THREADS=1 python -m experiments.exo_vs_dpo [--seeds 5] [--out DIR]
Writes OUT/{sft/ (pi_SFT), results.json, frontier.png} and prints the table.
Training and measuring are in-process (`rayalign.oracle.train_pairs`, whose step the Ray Train workers run
and are tested equal to; `rayalign.samplers.HFSampler` with the live weights pushed to it), for the reason
`experiments.gdpo_opinions` gives. Not here: the loop (a one-round, offline comparison, as the paper's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from experiments.common import add_sft_arguments, make_sampler, quickstart_sft, save_figure, save_results
from experiments.stats import mean_se

ARMS = ("dpo", "dpo_rw", "exo_rw")
DEFAULT_OUT = Path("runs/experiments/exo_vs_dpo")
TEMPERATURE = 0.8  # the EXO paper's sampling and logit temperature
K = 4
EVAL_SAMPLES = 4


def log(message: str) -> None:
    print(f"exo_vs_dpo: {message}", flush=True)


def sample_groups(sampler, prompts: list[str], *, first_id: int = 0) -> tuple[list[dict], list]:
    """{prompt, completions[K], rewards[K]} per prompt (the sampler's K completions and their gold rewards),
    and the samples themselves (their token ids)."""
    from rayalign.tasks.sentiment import gold_reward

    samples = sampler.sample(prompts, list(range(first_id, first_id + len(prompts))))
    groups = [{"prompt": p, "completions": [s.text for s in g], "rewards": [gold_reward(s.text) for s in g]}
              for p, g in zip(prompts, samples, strict=True)]
    return groups, samples


def all_pairs(groups: list[dict]) -> list[dict]:
    """Every pair of a group's completions with different rewards, the higher one chosen, grouped by prompt."""
    pairs = []
    for g in groups:
        scored = list(zip(g["completions"], g["rewards"], strict=True))
        for i, (a, ra) in enumerate(scored):
            for b, rb in scored[i + 1:]:
                if ra != rb:
                    chosen, rejected = (a, b) if ra > rb else (b, a)
                    pairs.append({"prompt": g["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


def tempered_logps(model, sampler, prompts: list[str], samples: list) -> torch.Tensor:
    """Sequence log-prob of every sampled completion's own token ids, logits / TEMPERATURE, (N * K,)."""
    from rayalign.step import completion_logps
    from rayalign.templating import as_prompt, prompt_ids

    tokenizer = sampler.tokenizer
    ids = [prompt_ids(tokenizer, as_prompt(p))[0] for p in prompts]
    return completion_logps(model, [i for i, g in zip(ids, samples, strict=True) for _ in g],
                            [s.token_ids for g in samples for s in g], pad_token_id=tokenizer.pad_token_id,
                            temperature=TEMPERATURE)


def measure(policy, sft_model, sampler, prompts: list[str]) -> dict:
    """Mean gold reward and KL(pi_T || pi_SFT,T) on the live policy's own temperature-0.8 samples (top-p 1:
    the tempered softmax is exactly what sampled them)."""
    sampler.update_weights(policy.state_dict())
    groups, samples = sample_groups(sampler, prompts, first_id=1_000_000)
    kl = tempered_logps(policy, sampler, prompts, samples) - tempered_logps(sft_model, sampler, prompts, samples)
    rewards = [r for g in groups for r in g["rewards"]]
    return {"gold_reward": sum(rewards) / len(rewards), "kl": float(kl.double().mean())}


def train_config(arm: str, beta: float, rows: int, steps_per_epoch: int, args, seed: int):
    from rayalign.config_loader import load_config

    return load_config(None, [
        f"loss.type={arm}", f"loss.beta={beta}", f"loss.beta_r={args.beta_r}",
        f"loss.logit_temperature={TEMPERATURE}", "optim.name=adamw", f"optim.lr={args.lr}",
        "optim.scheduler=constant", "optim.warmup_ratio=0.1", f"train.epochs={args.epochs}",
        f"train.global_batch_size={-(-rows // steps_per_epoch)}", f"train.seed={seed}",
        "data.max_prompt_length=64", "data.max_completion_length=48"])


def run_arm(arm: str, beta: float, sft: str, groups: list[dict], context: dict, args, seed: int) -> list[dict]:
    """Train one arm at one beta from pi_SFT; its measured points, one per --eval-every steps."""
    from rayalign.models import load_model
    from rayalign.oracle import train_pairs

    rows = all_pairs(groups) if arm == "dpo" else groups
    steps_per_epoch = -(-len(groups) // args.batch)
    config = train_config(arm, beta, len(rows), steps_per_epoch, args, seed)
    torch.manual_seed(seed)
    policy = load_model(sft)
    points = []

    def on_step(metrics: dict) -> None:
        if metrics["step"] % args.eval_every == 0:
            points.append({"step": metrics["step"], **measure(policy, context["sft_model"], context["sampler"],
                                                                context["eval_prompts"])})
            policy.train()

    train_pairs(policy, context["sft_model"], context["tokenizer"], rows, config, on_step=on_step)
    return points


def front_reward(points: list[tuple[float, float]], budget: float) -> float:
    """The reward of the Pareto front of (kl, reward) points at KL `budget`: linear between front points, flat
    after its last (best) point up to the largest KL any point reached, NaN beyond that (never explored)."""
    front, best = [], float("-inf")
    for kl, reward in sorted(points):
        if reward > best:
            front.append((kl, reward))
            best = reward
    if budget > max(kl for kl, _ in points):
        return float("nan")
    for (k0, r0), (k1, r1) in zip(front, front[1:]):
        if budget <= k1:
            return r0 + (r1 - r0) * (budget - k0) / (k1 - k0) if budget > k0 else r0
    return front[-1][1]


def seed_fronts(run: dict, budgets: list[float]) -> dict[str, list[float]]:
    """Per arm: front_reward at every budget from this seed's points (pi_SFT's point included)."""
    origin = (0.0, run["sft"]["gold_reward"])
    fronts = {}
    for arm in run["arms"]:
        points = [origin] + [(p["kl"], p["gold_reward"]) for beta in run["arms"][arm].values() for p in beta]
        fronts[arm] = [front_reward(points, b) for b in budgets]
    return fronts


def summarise(runs: list[dict], budgets: list[float]) -> dict:
    """Per arm and budget: mean ± s.e. of the front's reward over the seeds that reached it, and paired
    differences against dpo (seeds where both reached it)."""
    fronts = [seed_fronts(run, budgets) for run in runs]
    arms = list(runs[0]["arms"])
    out = {"budgets": budgets, "arms": {}, "vs_dpo": {}}
    for arm in arms:
        out["arms"][arm] = [mean_se([f[arm][i] for f in fronts if f[arm][i] == f[arm][i]]) + (
            sum(f[arm][i] == f[arm][i] for f in fronts),) for i in range(len(budgets))]
        if arm != "dpo" and "dpo" in arms:
            out["vs_dpo"][arm] = [mean_se([f[arm][i] - f["dpo"][i] for f in fronts
                                           if f[arm][i] == f[arm][i] and f["dpo"][i] == f["dpo"][i]])
                                  for i in range(len(budgets))]
    if {"exo_rw", "dpo_rw"} <= set(arms):
        out["exo_rw_vs_dpo_rw"] = [mean_se([f["exo_rw"][i] - f["dpo_rw"][i] for f in fronts
                                            if f["exo_rw"][i] == f["exo_rw"][i] and f["dpo_rw"][i] == f["dpo_rw"][i]])
                                   for i in range(len(budgets))]
    return out


def table(summary: dict, runs: list[dict]) -> str:
    sft = mean_se([run["sft"]["gold_reward"] for run in runs])
    lines = [f"pi_SFT gold reward {sft[0]:+.3f} ± {sft[1]:.3f}; reward of each arm's front at KL budget "
             f"(mean ± s.e. over seeds that reached it, n):",
             f"{'arm':10} " + " ".join(f"{'KL ' + format(b, 'g'):>22}" for b in summary["budgets"])]
    for arm, cells in summary["arms"].items():
        lines.append(f"{arm:10} " + " ".join(f"{m:+.3f} ± {s:.3f} (n={n})".rjust(22) for m, s, n in cells))
    diffs = {f"{a} - dpo": v for a, v in summary["vs_dpo"].items()}
    if "exo_rw_vs_dpo_rw" in summary:
        diffs["exo_rw - dpo_rw"] = summary["exo_rw_vs_dpo_rw"]
    for name, cells in diffs.items():
        lines.append(f"{name:10} " + " ".join(f"{m:+.3f} ± {s:.3f}".rjust(22) for m, s in cells))
    return "\n".join(lines)


def plot(runs: list[dict], summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    sft = mean_se([run["sft"]["gold_reward"] for run in runs])[0]
    left.scatter([0], [sft], color="black", zorder=3, label="pi_SFT")
    for color, arm in zip(("C0", "C2", "C3"), runs[0]["arms"]):
        mean_points = []
        for beta in runs[0]["arms"][arm]:
            for i in range(len(runs[0]["arms"][arm][beta])):
                kl = mean_se([run["arms"][arm][beta][i]["kl"] for run in runs])
                reward = mean_se([run["arms"][arm][beta][i]["gold_reward"] for run in runs])
                left.errorbar(kl[0], reward[0], xerr=kl[1], yerr=reward[1], color=color, fmt="o", ms=4,
                              alpha=0.4 + 0.6 * (i + 1) / len(runs[0]["arms"][arm][beta]), capsize=2)
                left.annotate(f"{beta}", (kl[0], reward[0]), textcoords="offset points", xytext=(3, 3),
                              fontsize=6, color=color)
                mean_points.append((kl[0], reward[0]))
        grid = [x * max(k for k, _ in mean_points) / 60 for x in range(61)]
        left.plot(grid, [front_reward([(0.0, sft)] + mean_points, b) for b in grid], color=color, label=arm)
        cells = summary["arms"][arm]
        right.errorbar(summary["budgets"], [c[0] for c in cells], yerr=[c[1] for c in cells], color=color,
                       marker="o", capsize=3, label=arm)
    left.set(xlabel="KL(pi || pi_SFT), nats per completion (T = 0.8)", ylabel="mean gold reward, held-out prompts",
             title="points: (beta, step), mean ± s.e. over seeds; line: front of the means")
    right.set(xscale="log", xlabel="KL budget", ylabel="reward of the seed's front at that KL",
              title=f"reward at matched KL, mean ± s.e. over {len(runs)} seeds")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.2, 0.5, 1.0])
    parser.add_argument("--beta-r", type=float, default=1.0,
                        help="target temperature of dpo_rw/exo_rw; the gold rewards are integer word counts")
    parser.add_argument("--prompts", type=int, default=256, help="training prompts per seed (K samples each)")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="prompts per optimizer step")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--eval-every", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--kl-budgets", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    add_sft_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from rayalign.tasks.sentiment import make_prompts

    began = time.time()
    sft, tokenizer, sft_model = quickstart_sft(args)
    eval_prompts, runs = make_prompts(args.eval_prompts, seed=20_000), []
    for seed in range(args.seeds):
        sampler = make_sampler(sft, num_samples=K, temperature=TEMPERATURE, seed=seed,
                               max_new_tokens=args.max_new_tokens)
        groups, _ = sample_groups(sampler, make_prompts(args.prompts, seed=100 + seed))
        eval_sampler = make_sampler(sft, num_samples=EVAL_SAMPLES, temperature=TEMPERATURE, seed=500 + seed,
                                    max_new_tokens=args.max_new_tokens)
        context = {"sft_model": sft_model, "sampler": eval_sampler, "tokenizer": tokenizer,
                   "eval_prompts": eval_prompts}
        run = {"seed": seed, "pairs": len(all_pairs(groups)), "arms": {},
               "sft": measure(sft_model, sft_model, eval_sampler, eval_prompts)}
        for arm in args.arms:
            run["arms"][arm] = {}
            for beta in args.betas:
                started = time.perf_counter()
                run["arms"][arm][str(beta)] = run_arm(arm, beta, sft, groups, context, args, seed)
                log(f"seed {seed} {arm} beta {beta}: {run['arms'][arm][str(beta)][-1]} "
                    f"({time.perf_counter() - started:.0f} s)")
        runs.append(run)
    summary = summarise(runs, args.kl_budgets)
    save_results(args.out / "results.json", args, summary=summary, runs=runs)
    print(table(summary, runs))
    log(f"plot {plot(runs, summary, args.out / 'frontier.png')}; {time.time() - began:.0f} s")
    return summary


if __name__ == "__main__":
    main()
