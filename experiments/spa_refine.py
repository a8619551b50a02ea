"""SPA's self-refinement, tested as the paper sets it up: does it find the judge's mistakes, and does that help?

SPA (Kim et al., ICLR 2025; ALGORITHMS.md §5) trains iteration i on pairs that pi_{i-1} judged itself (the
implicit reward beta * log pi_{i-1}/pi_SFT ranks 2 samples per prompt), and its self-refinement gives a soft
label (label smoothing alpha) to the pairs whose de-coupled confidence margin is in the lowest k_fraction of
a window of recent margins: the pairs it suspects the judge got wrong. Here, on the quickstart's sentiment
task with its gold reward, per seed s:
  pi_SFT     the quickstart's SFT'd tiny Llama (`rayalign.loop.build_task_sft`), shared by all seeds;
  pi_0       DPO from pi_SFT on --seed-pairs gold pairs (seed s), shared by the arms;
  iteration  i = 1..--iterations: --prompts fresh prompts, K = 2 samples each from pi_{i-1} (temperature 0.7,
             top-p 1), judged by pi_{i-1} exactly as the Judge actor does (the sequence log-probs of the
             samples' own token ids; ties and identical samples dropped); pi_i trains from pi_{i-1}, with
             pi_{i-1} as reference, DPO beta 0.1, batch 32 pairs, --epochs epochs (hundreds of steps), in arms:
  no_refine  plain DPO on the judged pairs
  refine_1   self-refinement with mix = 1 (no de-coupling: the margin is the policy's own)
  refine     self-refinement with mix = 1 + lambda (1.5, 1.25, ... by iteration, the paper's de-coupling)
             (window 50 pairs, k_fraction 0.1, alpha 0.1, 20% warm start: `spa.*` defaults)
Iteration 1's samples and judgments come from pi_0 and are shared by the arms; later iterations sample from
each arm's own model. Measured per arm and iteration:
  - the mechanism: of the pairs refinement flagged (counted per training occurrence, active steps only), the
    share that are judge errors by the gold reward (precision), and of the judge errors in those steps, the
    share flagged (recall), next to the base rate of judge errors; pairs whose gold rewards tie are neither;
  - the outcome: mean gold reward of pi_i's samples on --eval-prompts held-out prompts (4 samples each), and
    the win rate of pi_i against pi_{i-1} of the same arm (per prompt, mean gold reward; ties count 1/2).
Mean ± s.e. over --seeds seeds, and paired differences against no_refine.

Run from the repository root:  OMP_NUM_THREADS=1 python -m experiments.spa_refine [--seeds 5] [--out DIR]
Writes OUT/{sft/, results.json, spa_refine.png} and prints the table. In-process (`rayalign.oracle.train_pairs`,
`rayalign.samplers.HFSampler` with each model's weights pushed to it), for the reason
`experiments.gdpo_opinions` gives.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import torch

from experiments.common import add_sft_arguments, make_sampler, quickstart_sft, save_figure, save_results
from experiments.stats import mean_se

ARMS = {"no_refine": [], "refine_1": ["spa.refine=true", "spa.mix_schedule=[1.0]"], "refine": ["spa.refine=true"]}
DEFAULT_OUT = Path("runs/experiments/spa_refine")
TEMPERATURE = 0.7
EVAL_SAMPLES = 4
BETA = 0.1


def log(message: str) -> None:
    print(f"spa_refine: {message}", flush=True)


def sample(sampler, model, prompts: list[str], *, first_id: int, chunk: int = 256) -> list[list]:
    """`model`'s samples of every prompt (the sampler's K), in chunks of prompts."""
    sampler.update_weights(model.state_dict())
    out = []
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        out += sampler.sample(part, list(range(first_id + start, first_id + start + len(part))))
    return out


@torch.no_grad()
def judge(policy, sft_model, tokenizer, prompts: list[str], samples: list[list]) -> tuple[list[dict], dict]:
    """SPA's direct judgment of 2 samples per prompt (`rayalign.core.spa`, as the Judge actor does): pairs
    {prompt, chosen, rejected, gold_error} and counts. `gold_error`: True where the gold reward ranks the pair
    the other way, None where it ties."""
    from rayalign.core.spa import implicit_rewards, judge_pairs
    from rayalign.step import completion_logps
    from rayalign.tasks.sentiment import gold_reward
    from rayalign.templating import as_prompt, prompt_ids

    ids = [prompt_ids(tokenizer, as_prompt(p))[0] for p in prompts]
    flat_prompts = [i for i, group in zip(ids, samples, strict=True) for _ in group]
    flat = [s.token_ids for group in samples for s in group]
    pad = tokenizer.pad_token_id
    rewards = implicit_rewards(completion_logps(policy, flat_prompts, flat, pad_token_id=pad),
                               completion_logps(sft_model, flat_prompts, flat, pad_token_id=pad), beta=BETA)
    chosen_index, rejected_index, _, tied = judge_pairs(rewards.view(len(prompts), -1))
    pairs, dropped = [], 0
    for j, (prompt, group) in enumerate(zip(prompts, samples, strict=True)):
        chosen, rejected = group[int(chosen_index[j])].text, group[int(rejected_index[j])].text
        if tied[j] or chosen == rejected or not chosen.strip() or not rejected.strip():
            dropped += 1
            continue
        gc, gr = gold_reward(chosen), gold_reward(rejected)
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                      "gold_error": None if gc == gr else gc < gr})
    decided = [p["gold_error"] for p in pairs if p["gold_error"] is not None]
    return pairs, {"pairs": len(pairs), "dropped": dropped, "judge_accuracy": 1 - sum(decided) / max(1, len(decided))}


@contextlib.contextmanager
def recorded_flags():
    """Within: every step's pair indices and SPA's per-pair label smoothing (eps > 0: flagged), in step order."""
    import rayalign.oracle as oracle
    import rayalign.step as step

    steps, smoothing = [], []
    original_batches, original_smoothing = oracle.step_batches, step.refine_smoothing

    def batches(*args, **kwargs):
        for epoch, indices in original_batches(*args, **kwargs):
            steps.append(list(indices))
            yield epoch, indices

    def refine_smoothing(*args, **kwargs):
        margins, eps = original_smoothing(*args, **kwargs)
        smoothing.append((args[-1].active, (eps > 0).tolist()))
        return margins, eps

    record: list = []
    oracle.step_batches, step.refine_smoothing = batches, refine_smoothing
    try:
        yield record
    finally:
        oracle.step_batches, step.refine_smoothing = original_batches, original_smoothing
        record.extend(zip(steps, smoothing))  # one micro-batch per step (1 worker, no accumulation)


def detection(record: list, pairs: list[dict]) -> dict:
    """Precision and recall of the flags against the gold judge errors, over the active steps' occurrences."""
    flagged = errors = hits = seen = 0
    for indices, (active, flags) in record:
        if not active:
            continue
        for i, flag in zip(indices, flags, strict=True):
            error = pairs[i]["gold_error"]
            if error is None:
                continue
            seen, flagged, errors, hits = seen + 1, flagged + flag, errors + error, hits + (flag and error)
    return {"precision": hits / flagged if flagged else None, "recall": hits / errors if errors else None,
            "base_rate": errors / seen if seen else None, "flagged": flagged}


def train_config(overrides: list[str], *, iteration: int, epochs: int, lr: float, batch: int, seed: int):
    from rayalign.config_loader import load_config

    return load_config(None, [
        "loss.type=dpo", f"loss.beta={BETA}", "optim.name=adamw", f"optim.lr={lr}", "optim.scheduler=cosine",
        "optim.warmup_ratio=0.1", f"train.global_batch_size={batch}", f"train.epochs={epochs}", f"train.seed={seed}",
        "data.max_prompt_length=64", "data.max_completion_length=48", "spa.window=50", f"spa.iteration={iteration}",
        *overrides])


def train(start, rows: list[dict], tokenizer, config, seed: int):
    """pi_i: a copy of `start` trained on `rows` with `start` as the reference; and the refinement record."""
    from rayalign.oracle import train_pairs

    torch.manual_seed(seed)
    policy, reference = copy.deepcopy(start).requires_grad_(True), copy.deepcopy(start).requires_grad_(False).eval()
    with recorded_flags() as record:
        history = train_pairs(policy, reference, tokenizer, [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                              for r in rows], config)
    return policy.eval(), record, len(history)


@torch.no_grad()
def evaluate(model, previous_scores: torch.Tensor | None, sampler, prompts: list[str]) -> tuple[dict, torch.Tensor]:
    """Mean gold reward of `model`'s samples of the eval prompts, its win rate against the previous model's
    per-prompt scores, and its own per-prompt scores (mean gold reward of the prompt's samples)."""
    from rayalign.core.metrics import win_rate
    from rayalign.tasks.sentiment import gold_reward

    samples = sample(sampler, model, prompts, first_id=1_000_000)
    scores = torch.tensor([sum(gold_reward(s.text) for s in g) / len(g) for g in samples], dtype=torch.float64)
    win = None if previous_scores is None else float(win_rate(scores, previous_scores))
    return {"gold_reward": float(scores.mean()), "win_vs_previous": win}, scores


def run_seed(seed: int, sft: str, sft_model, tokenizer, args) -> dict:
    """Every arm's iterations for one seed (pi_0 and iteration 1's judged pairs shared)."""
    from rayalign.tasks.sentiment import gold_pairs, make_prompts

    sampler = make_sampler(sft, num_samples=2, temperature=TEMPERATURE, seed=seed, max_new_tokens=args.max_new_tokens)
    eval_sampler = make_sampler(sft, num_samples=EVAL_SAMPLES, temperature=TEMPERATURE, seed=500 + seed,
                                max_new_tokens=args.max_new_tokens)
    eval_prompts = make_prompts(args.eval_prompts, seed=20_000)
    zero_config = train_config([], iteration=1, epochs=args.seed_epochs, lr=args.lr, batch=16, seed=seed)
    pi_0, _, _ = train(sft_model, gold_pairs(args.seed_pairs, seed=seed), tokenizer, zero_config, seed)
    _, sft_scores = evaluate(sft_model, None, eval_sampler, eval_prompts)
    start, start_scores = evaluate(pi_0, sft_scores, eval_sampler, eval_prompts)
    result = {"seed": seed, "pi_0": start, "arms": {}}
    shared = None
    for arm, overrides in ARMS.items():
        model, previous, records = pi_0, start_scores, []
        for i in range(1, args.iterations + 1):
            began = time.perf_counter()
            prompts = make_prompts(args.prompts, seed=1000 * seed + i)
            if i == 1 and shared is not None:
                pairs, counts = shared
            else:
                samples = sample(sampler, model, prompts, first_id=100_000 * i)
                pairs, counts = judge(model, sft_model, tokenizer, prompts, samples)
                shared = shared or (pairs, counts)
            config = train_config(overrides, iteration=i, epochs=args.epochs, lr=args.lr, batch=args.batch, seed=seed)
            model, record, steps = train(model, pairs, tokenizer, config, seed)
            metrics, previous = evaluate(model, previous, eval_sampler, eval_prompts)
            records.append({"iteration": i, **counts, "steps": steps, **metrics,
                            **(detection(record, pairs) if record else {})})
            log(f"seed {seed} {arm} iteration {i}: {records[-1]} ({time.perf_counter() - began:.0f} s)")
        result["arms"][arm] = records
    return result


METRICS = ("judge_accuracy", "gold_reward", "win_vs_previous", "precision", "recall", "base_rate", "flagged")


def summarise(runs: list[dict]) -> dict:
    """arm -> iteration -> metric -> (mean, s.e.) over seeds; and the paired differences against no_refine."""
    out: dict = {"arms": {}, "vs_no_refine": {}}
    for arm in runs[0]["arms"]:
        out["arms"][arm] = [{m: mean_se([run["arms"][arm][i].get(m) for run in runs]) for m in METRICS}
                            for i in range(len(runs[0]["arms"][arm]))]
        if arm != "no_refine":
            out["vs_no_refine"][arm] = [
                {m: mean_se([run["arms"][arm][i][m] - run["arms"]["no_refine"][i][m] for run in runs])
                 for m in ("gold_reward", "win_vs_previous")} for i in range(len(runs[0]["arms"][arm]))]
    return out


def table(summary: dict, runs: list[dict]) -> str:
    pi_0 = mean_se([run["pi_0"]["gold_reward"] for run in runs])
    lines = [f"pi_0 gold reward {pi_0[0]:.3f} ± {pi_0[1]:.3f}; mean ± s.e. over {len(runs)} seeds",
             f"{'arm':10} {'it':>2} " + " ".join(f"{m:>16}" for m in METRICS)]
    for arm, iterations in summary["arms"].items():
        for i, cells in enumerate(iterations, start=1):
            lines.append(f"{arm:10} {i:>2} " + " ".join(
                f"{cells[m][0]:.3f} ± {cells[m][1]:.3f}".rjust(16) if cells[m][0] == cells[m][0] else f"{'-':>16}"
                for m in METRICS))
    for arm, iterations in summary["vs_no_refine"].items():
        for i, cells in enumerate(iterations, start=1):
            lines.append(f"{arm} - no_refine, iteration {i}: gold reward {cells['gold_reward'][0]:+.3f} ± "
                         f"{cells['gold_reward'][1]:.3f}, win vs previous {cells['win_vs_previous'][0]:+.3f} ± "
                         f"{cells['win_vs_previous'][1]:.3f}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("gold_reward", "mean gold reward, held-out prompts"), ("win_vs_previous", "win rate vs pi_{i-1}"),
              ("precision", "flagged pairs that are judge errors"), ("recall", "judge errors that were flagged"))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (metric, title) in zip(axes, panels):
        for offset, (color, arm) in zip((-0.08, 0.0, 0.08), zip(("C0", "C1", "C3"), summary["arms"])):
            cells = summary["arms"][arm]
            xs = [i + 1 + offset for i, c in enumerate(cells) if c[metric][0] == c[metric][0]]
            ys = [c[metric] for c in cells if c[metric][0] == c[metric][0]]
            if xs:
                ax.errorbar(xs, [y[0] for y in ys], yerr=[y[1] for y in ys], color=color, marker="o", capsize=3,
                            label=arm)
        if metric == "precision":  # what flagging at random would give
            base = summary["arms"]["refine"]
            ax.plot([i + 1 for i in range(len(base))], [c["base_rate"][0] for c in base], color="grey", ls="--",
                    label="base rate of judge errors")
        ax.set(title=title, xlabel="iteration", xticks=range(1, len(summary["arms"]["refine"]) + 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    return save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=1600, help="prompts per iteration (2 samples each)")
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed-pairs", type=int, default=128)
    parser.add_argument("--seed-epochs", type=int, default=2)
    add_sft_arguments(parser, DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    began = time.time()
    sft, tokenizer, sft_model = quickstart_sft(args)
    runs = [run_seed(seed, sft, sft_model, tokenizer, args) for seed in range(args.seeds)]
    summary = summarise(runs)
    save_results(args.out / "results.json", args, summary=summary, runs=runs)
    print(table(summary, runs))
    log(f"plot {plot(summary, args.out / 'spa_refine.png')}; {time.time() - began:.0f} s")
    return summary


if __name__ == "__main__":
    main()
