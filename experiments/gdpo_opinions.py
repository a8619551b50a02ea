"""GDPO vs DPO on the synthetic opinion task: does DPO drift to each group's majority belief while GDPO
keeps the model's belief distribution close to the group's (Yao et al., ICLR 2025; ALGORITHMS.md §3)?

Per seed s: the task of `rayalign.tasks.opinions` with seed s (50 questions, 4 groups, p* ~ Dirichlet(1)
over each question's levels, ROWS_PER_PROMPT rows per (group, question) with beliefs b ~ p*), of which
HELDOUT_QUESTIONS whole questions (all groups; seeded) are kept out of every SFT and preference row; a tiny
Llama (seed s) whose tokenizer is trained on the task's texts, SFT on the other rows' chosen completions ->
pi_SFT, then from pi_SFT, with pi_SFT as the reference and the same batches, steps and learning rate:
  dpo        loss.type=dpo on `gdpo_rows_as_pairs`: whole completions "{b}<{text}>answer", rejected = another
             belief's
  gdpo       loss.type=gdpo: KL(p* || q) + belief NLL + DPO on the answers within the stated belief
  gdpo_hist  the information-matched control: GDPO whose target is each (group, question)'s histogram of the
             8 sampled beliefs in its rows (what DPO's pairs carry) instead of the true p*
Every --eval-every steps (and at step 0) both gap measures are taken on the test prompts, in a phrasing the
rows never use: every (group, question) of the trained questions ("seen"; per group and overall) and of
the held-out questions ("unseen"). p* is drawn independently per (group, question), so nothing about an
unseen question's p* can be learnt: there the measures show what training does to a belief distribution
the model was never taught (how far each loss sharpens or flattens it), not generalisation.
  (a) JS distance between p* and the softmax over the L digit logits at the first completion position;
  (b) JS distance between p* and the histogram of the first token of 8 completions sampled at temperature 1
      (no top-k/top-p) over L + 1 bins, non-digits in their own bin (p* = 0 there). The first token of a
      sampled completion is a draw from the softmax at the last prompt position, so it is drawn from there.
plus where (a) puts its mass: on p*'s majority level, on the level the prompt's rows chose most often (what
DPO's pair counts favour; prompts with a tie left out), on the model's own top level (p*'s is printed below),
and how much of the full vocabulary's probability the L digits hold at all.
With only 8 samples (b) has a floor: a model that is exactly p* still scores the `floor` line of the table.

Training is in-process (`rayalign.oracle.train_pairs`, whose step is `micro_batch_loss`, the one the Ray Train
workers run and are tested equal to) with an `on_step` hook that measures the live policy: through
`rayalign train` every run would pay Ray start-up and every measuring point a checkpoint save and reload,
for the same numbers, on a shared 2-core machine.
Hyper-parameters: AdamW, lr 1e-3 (constant after 10% warm-up), beta 0.1, batch 32 pairs, 6 epochs (240
steps on the 40 trained questions), GDPO weights 1 (the authors'); SFT 8 epochs at 3e-3 (`rayalign.sft`). The
paper's RMSprop at 5e-7 is for 7B models: a 2-layer, 64-wide model moves ~nothing at that rate, and at 1e-3
the calibration term alone brings (a) from 0.26 to ~0.1 in ~500 steps on these prompts. The same lr for all
arms; DPO at 1e-4 was also run earlier (`--arms dpo --lr 1e-4`) to check its drift is not just a too-large step.

Run from the repository root:
  OMP_NUM_THREADS=1 python -m experiments.gdpo_opinions [--seeds 0 1 2 3 4] [--out DIR]
  OMP_NUM_THREADS=1 python -m experiments.gdpo_opinions --prepare DIR    # data + pi_SFT for configs/tune_gdpo.yaml
Measured at commit b0d5faf (5 seeds, 3 arms, SFT included): 973 s on one core of the shared 2-core machine;
per seed ~25 s SFT and 50-65 s per arm. Result (mean ± s.e., step 0 -> 240), gap (a) on the trained
questions: DPO 0.255 -> 0.465±0.013, GDPO -> 0.164±0.006, GDPO on the rows' histogram -> 0.202±0.003; on the
held-out questions 0.295 -> 0.519±0.019 / 0.301±0.011 / 0.347±0.013. Paired, GDPO - DPO -0.301±0.013 and the
control keeps -0.263±0.012 of it (GDPO - control -0.038±0.004): the loss, not the exact p*, does most of it.
Writes OUT/{seed<s>/ (task data, tiny model, pi_SFT), results.json, gap_curves.png} and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

DEFAULT_OUT = Path("runs/experiments/gdpo_opinions")
ROWS_PER_PROMPT = 8
SAMPLES = 8  # measure (b): completions sampled per test prompt
ARMS = ("dpo", "gdpo", "gdpo_hist")
HELDOUT_QUESTIONS = 10  # whole questions (every group) that no training or SFT row asks: the "unseen" test set
TRAIN_KEYS = ["optim.name=adamw", "optim.scheduler=constant", "optim.warmup_ratio=0.1", "loss.beta=0.1",
              "train.global_batch_size=32", "data.max_prompt_length=64", "data.max_completion_length=48"]


def log(message: str) -> None:
    print(f"gdpo_opinions: {message}", flush=True)


def heldout_questions(num_questions: int, count: int, *, seed: int) -> set[int]:
    """The qids held out of training (seeded); at least one question is always left to train on."""
    import random

    return set(random.Random(seed * 7 + 1).sample(range(num_questions), min(count, num_questions - 1)))


def load_split(paths: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training rows of the seen questions, {"seen": test prompts of seen questions, "unseen": of held-out})."""
    heldout = set(json.loads(paths["heldout"].read_text()))
    rows = [r for r in map(json.loads, paths["train"].read_text().splitlines()) if r["question"] not in heldout]
    tests = [json.loads(line) for line in paths["test_prompts"].read_text().splitlines()]
    return rows, {"seen": with_row_top([t for t in tests if t["question"] not in heldout], rows),
                  "unseen": [t for t in tests if t["question"] in heldout]}


def prepare(out: Path, *, seed: int, sft_epochs: int, sft_lr: float, questions: int = 50,
            heldout: int = HELDOUT_QUESTIONS) -> dict[str, Path]:
    """The task's files, the held-out qids and pi_SFT (trained on the seen questions' rows only) in `out`
    (kept: a second call with the same settings reuses them); returns their paths."""
    from rayalign.io import atomic_directory, atomic_write_text
    from rayalign.sft import run_sft
    from rayalign.tasks import opinions
    from rayalign.tiny import make_tiny_model

    paths = opinions.write_task(out / "data", seed=seed, per_prompt=ROWS_PER_PROMPT, num_questions=questions)
    paths["heldout"] = out / "data" / "heldout_questions.json"
    atomic_write_text(paths["heldout"], json.dumps(sorted(heldout_questions(questions, heldout, seed=seed))))
    tiny, sft = out / "tiny-model", out / ("sft" if not heldout else f"sft-{heldout}-heldout")
    if not (tiny / "config.json").exists():
        with atomic_directory(tiny) as tmp:
            make_tiny_model(tmp, corpus=paths["corpus"], seed=seed)
    if not (sft / "config.json").exists():
        rows, _ = load_split(paths)
        run_sft(str(tiny), opinions.sft_examples(rows), sft, epochs=sft_epochs, lr=sft_lr, seed=seed,
                log=lambda message: None)
    return {**paths, "sft": sft}


def belief_counts(rows: list[dict]) -> dict[tuple[str, int], Counter]:
    """(group, question) -> how often its rows state each belief level."""
    counts: dict = {}
    for r in rows:
        counts.setdefault((r["group"], r["question"]), Counter())[r["belief"]] += 1
    return counts


def with_histogram_targets(rows: list[dict]) -> list[dict]:
    """The information-matched control: each row's GDPO target replaced by its (group, question)'s histogram
    of the sampled beliefs in the training rows, exactly what DPO's pairs carry, instead of the true p*."""
    counts = belief_counts(rows)
    out = []
    for r in rows:
        seen = counts[(r["group"], r["question"])]
        total = sum(seen.values())
        out.append({**r, "target": [seen[level] / total for level in range(len(r["target"]))]})
    return out


def arm_rows(arm: str, rows: list[dict]) -> list[dict]:
    from rayalign.batching import gdpo_rows_as_pairs

    return {"dpo": gdpo_rows_as_pairs, "gdpo": list, "gdpo_hist": with_histogram_targets}[arm](rows)


@torch.no_grad()
def measure(policy, tokenizer, tests: list[dict], *, generator: torch.Generator) -> dict:
    """Both gap measures, the majority mass and the digits' total probability, overall and per group."""
    from rayalign.core.metrics import js_distance

    ids = [tokenizer(t["prompt"], add_special_tokens=False)["input_ids"] for t in tests]
    width = max(map(len, ids))
    batch = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    was_training = policy.training
    policy.eval()
    logits = policy(input_ids=batch, attention_mask=mask).logits[torch.arange(len(ids)), mask.sum(1) - 1]
    policy.train(was_training)
    probs = torch.softmax(logits.double(), -1)
    levels = len(tests[0]["target"])
    digit_ids = torch.tensor([tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(levels)])
    digits = probs[:, digit_ids]
    q = digits / digits.sum(-1, keepdim=True)
    target = torch.tensor([t["target"] for t in tests], dtype=torch.float64)
    draws = torch.multinomial(probs, SAMPLES, replacement=True, generator=generator)  # (N, SAMPLES) token ids
    bins = torch.full((probs.shape[-1],), levels)  # every token is "not a digit" (bin L) but the L digits
    bins[digit_ids] = torch.arange(levels)
    histogram = torch.nn.functional.one_hot(bins[draws], levels + 1).double().mean(1)
    row_top = torch.tensor([t.get("row_top", -1) for t in tests])
    per_prompt = {"gap_a": js_distance(target, q),
                  "gap_b": js_distance(torch.cat([target, torch.zeros(len(tests), 1)], -1), histogram),
                  "majority_mass": q.gather(-1, target.argmax(-1, keepdim=True))[:, 0],
                  "row_top_mass": torch.where(row_top >= 0, q.gather(-1, row_top.clamp(min=0)[:, None])[:, 0],
                                              torch.nan),
                  "top_mass": q.max(-1).values, "digit_mass": digits.sum(-1)}
    groups = sorted({t["group"] for t in tests})
    member = {g: torch.tensor([t["group"] == g for t in tests]) for g in groups}
    return {**{k: float(v.nanmean()) for k, v in per_prompt.items()},
            "groups": {g: {k: float(v[member[g]].nanmean()) for k, v in per_prompt.items()} for g in groups}}


def with_row_top(tests: list[dict], rows: list[dict]) -> list[dict]:
    """Each test prompt with `row_top`: the level its (group, question) rows chose most often (what DPO's
    pairwise counts favour), -1 where two levels tie."""
    counts = belief_counts(rows)
    out = []
    for t in tests:
        top = counts[(t["group"], t["question"])].most_common(2)
        out.append({**t, "row_top": top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else -1})
    return out


def reference_numbers(tests: list[dict], *, seed: int, repeats: int = 50) -> dict:
    """p*'s own majority mass, and the floor of measure (b): its expected value for a model equal to p*."""
    from rayalign.core.metrics import js_distance

    target = torch.tensor([t["target"] for t in tests], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    padded = torch.cat([target, torch.zeros(len(tests), 1)], -1)
    floors = [float(js_distance(padded, torch.nn.functional.one_hot(
        torch.multinomial(padded, SAMPLES, replacement=True, generator=generator), padded.shape[-1]).double().mean(1)
    ).mean()) for _ in range(repeats)]
    return {"floor_b": statistics.mean(floors), "target_majority_mass": float(target.max(-1).values.mean())}


def run_arm(arm: str, paths: dict, *, seed: int, args) -> list[dict]:
    """Train one arm from pi_SFT, measuring at step 0 and every `args.eval_every` steps; returns the points
    (the seen questions' numbers at the top level, the held-out questions' under "unseen")."""
    from rayalign.config_loader import load_config
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    loss = "dpo" if arm == "dpo" else "gdpo"
    config = load_config(None, [*TRAIN_KEYS, f"loss.type={loss}", f"optim.lr={args.lr}", f"train.epochs={args.epochs}",
                                f"train.seed={seed}", *args.overrides])
    rows, tests = load_split(paths)
    torch.manual_seed(seed)
    tokenizer, policy = load_tokenizer(str(paths["sft"])), load_model(str(paths["sft"]))
    reference = copy.deepcopy(policy).requires_grad_(False)
    points = []

    def record(step: int) -> None:
        # the same sampling stream for every arm at a given step: their (b) values are paired
        generator = torch.Generator().manual_seed(seed * 100_003 + step)
        seen = measure(policy, tokenizer, tests["seen"], generator=generator)
        unseen = measure(policy, tokenizer, tests["unseen"], generator=generator) if tests["unseen"] else {}
        points.append({"step": step, **seen, "unseen": unseen})

    def on_step(metrics: dict) -> None:
        if metrics["step"] % args.eval_every == 0:
            record(metrics["step"])

    record(0)
    started = time.perf_counter()
    history = train_pairs(policy, reference, tokenizer, arm_rows(arm, rows), config, on_step=on_step)
    if points[-1]["step"] != len(history):
        record(len(history))
    first, last = points[0], points[-1]
    unseen = [p["unseen"].get("gap_a", float("nan")) for p in (first, last)]
    log(f"seed {seed} {arm}: {len(history)} steps in {time.perf_counter() - started:.0f} s; gap a "
        f"{first['gap_a']:.3f} -> {last['gap_a']:.3f}, b {first['gap_b']:.3f} -> {last['gap_b']:.3f}; unseen "
        f"questions a {unseen[0]:.3f} -> {unseen[1]:.3f}")
    return points


def _stats(values: list[float]) -> str:
    """mean ± standard error over seeds."""
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f}±{se:.3f}"


METRICS = (("gap_a", "gap (a) digits"), ("gap_b", "gap (b) 8 samples"), ("majority_mass", "p*-majority mass"),
           ("row_top_mass", "rows-majority mass"), ("top_mass", "top-level mass"), ("digit_mass", "digit prob. mass"))
UNSEEN = (("gap_a", "unseen q: gap (a)"), ("gap_b", "unseen q: gap (b)"), ("top_mass", "unseen q: top mass"))


def _value(point: dict, key: str, unseen: bool) -> float:
    return point["unseen"].get(key, float("nan")) if unseen else point[key]


def table(results: dict) -> str:
    """Per seed and arm: each metric at the first and last point, then mean ± s.e. over seeds (seen questions,
    then the held-out ones); the paired end-of-training differences between arms; then per group."""
    seeds = sorted(results["runs"], key=int)
    arms = [arm for arm in ARMS if arm in results["runs"][seeds[0]]]
    lines = [f"{'metric':20} {'arm':9} " + " ".join(f"{'seed ' + s:>13}" for s in seeds) + f" {'mean±se':>25}"]
    for unseen, metrics in ((False, METRICS), (True, UNSEEN)):
        for key, name in metrics:
            for arm in arms:
                starts = [_value(results["runs"][s][arm][0], key, unseen) for s in seeds]
                ends = [_value(results["runs"][s][arm][-1], key, unseen) for s in seeds]
                cells = " ".join(f"{a:.3f}->{b:.3f}".rjust(13) for a, b in zip(starts, ends))
                lines.append(f"{name:20} {arm:9} {cells} {_stats(starts) + '->' + _stats(ends):>25}")
    refs = [results["reference"][s] for s in seeds]
    lines.append(f"{'p* top-level mass':30} " + " ".join(f"{r['target_majority_mass']:>13.3f}" for r in refs))
    lines.append(f"{'gap (b) floor (model=p*)':30} " + " ".join(f"{r['floor_b']:>13.3f}" for r in refs))
    lines.append("paired differences at the end of training (mean ± s.e. over seeds; negative = first arm closer):")
    for first, second in (("gdpo", "dpo"), ("gdpo_hist", "dpo"), ("gdpo", "gdpo_hist")):
        if first in arms and second in arms:
            cells = [f"{'unseen' if unseen else 'seen'} {key} {_stats(_diffs(results, first, second, key, unseen))}"
                     for unseen in (False, True) for key in ("gap_a", "gap_b")]
            lines.append(f"  {first} - {second}: " + ", ".join(cells))
    groups = sorted(results["runs"][seeds[0]][arms[0]][0]["groups"])
    lines.append("end of training, mean over seeds, per group: " + "   ".join(
        f"{g}: " + ", ".join(f"{arm} a {_group_end(results, arm, g, 'gap_a'):.3f} b "
                             f"{_group_end(results, arm, g, 'gap_b'):.3f}" for arm in arms) for g in groups))
    return "\n".join(lines)


def _diffs(results: dict, first: str, second: str, key: str, unseen: bool) -> list[float]:
    return [_value(run[first][-1], key, unseen) - _value(run[second][-1], key, unseen)
            for run in results["runs"].values()]


def _group_end(results: dict, arm: str, group: str, key: str) -> float:
    return statistics.mean(run[arm][-1]["groups"][group][key] for run in results["runs"].values())


def _curve(runs: list[list[dict]], value) -> tuple[list[int], list[float]]:
    """Mean over seeds of `value(point)` at each measuring step (every run measures at the same steps)."""
    return [p["step"] for p in runs[0]], [statistics.mean(value(r[i]) for r in runs) for i in range(len(runs[0]))]


def plot(results: dict, path: Path) -> Path:
    """Gap (a) and (b) over training: the seen questions (each seed faintly, the mean bold) and the held-out
    questions (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(results["runs"].values())
    arms = [arm for arm in ARMS if arm in runs[0]]
    floor = statistics.mean(r["floor_b"] for r in results["reference"].values())
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
    for row, (key, name) in enumerate(METRICS[:2]):
        for color, arm in zip(("C3", "C0", "C2"), arms):
            for run in runs:
                axes[row, 0].plot([p["step"] for p in run[arm]], [p[key] for p in run[arm]], color=color, alpha=0.2)
            for col, unseen in ((0, False), (1, True)):
                steps, mean = _curve([run[arm] for run in runs], lambda p, k=key, u=unseen: _value(p, k, u))
                axes[row, col].plot(steps, mean, color=color, linewidth=2, marker=".",
                                    label=f"{arm} (mean of {len(runs)})")
        if key == "gap_b":
            for ax in axes[row]:
                ax.axhline(floor, color="grey", linewidth=1, linestyle=":", label="floor (model = p*)")
        axes[row, 0].set(ylabel=f"{name}: JS distance to p*", title=f"{name}, trained questions (new phrasing)")
        axes[row, 1].set(title=f"{name}, held-out questions")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step (32 pairs)")
    fig.suptitle("opinion task: gap to each group's belief distribution (lower is better)\n"
                 "gdpo_hist: GDPO whose target is the rows' belief histogram (DPO's information)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--epochs", type=int, default=6, help="preference epochs over the task's rows (50 steps each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--sft-epochs", type=int, default=8)
    parser.add_argument("--questions", type=int, default=50, help="survey questions in the task")
    parser.add_argument("--heldout-questions", type=int, default=HELDOUT_QUESTIONS,
                        help="whole questions kept out of SFT and preference training, for evaluation")
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--prepare", type=Path, default=None, metavar="DIR",
                        help="only write seed 0's task data and pi_SFT into DIR (for configs/tune_gdpo.yaml)")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides for both arms")
    args = parser.parse_args(argv)
    if args.prepare:
        # the sweep (configs/tune_gdpo.yaml) trains on train.jsonl, every question: pi_SFT saw them all too
        paths = prepare(args.prepare, seed=args.seeds[0], sft_epochs=args.sft_epochs, sft_lr=args.sft_lr,
                        questions=args.questions, heldout=0)
        log("prepared " + ", ".join(f"{k} {v}" for k, v in paths.items()))
        return None
    started = time.perf_counter()
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}, "reference": {}}
    for seed in args.seeds:
        t0 = time.perf_counter()
        paths = prepare(args.out / f"seed{seed}", seed=seed, sft_epochs=args.sft_epochs, sft_lr=args.sft_lr,
                        questions=args.questions, heldout=args.heldout_questions)
        log(f"seed {seed}: task and pi_SFT ready in {time.perf_counter() - t0:.0f} s")
        tests = [json.loads(line) for line in paths["test_prompts"].read_text().splitlines()]
        results["reference"][str(seed)] = reference_numbers(tests, seed=seed)
        results["runs"][str(seed)] = {arm: run_arm(arm, paths, seed=seed, args=args) for arm in args.arms}
    results["seconds"] = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    log(f"plot {plot(results, args.out / 'gap_curves.png')}; {results['seconds']:.0f} s in all")
    return results


if __name__ == "__main__":
    main()
