"""SamS under label noise (ALGORITHMS.md §6, the paper's 20%-flipped setting) on the quickstart task.

A tiny Llama is SFT'd once on the sentiment task's reviews (`rayalign.loop.build_task_sft`). For each seed,
`--pairs` gold pairs are drawn and `--noise` of them get chosen and rejected swapped; every arm then trains
from the same SFT model with the same optimizer steps (batch `--batch` pairs, `--epochs` epochs: 192 bandit
rounds by default) through `rayalign.oracle.train_pairs` (the single-process trainer that shares its step
with the Ray workers) and is scored on `--heldout` clean pairs: implicit-reward accuracy, the spec's "test
accuracy". The arms:

    dpo_clean    DPO on the same pairs with the true labels: how much the flips cost at all
    dpo          DPO on the noisy pairs, every pair of each batch
    sams@rho     the SamS bandit chooses rho of each batch (sams.selector=bandit)
    random@rho   a seeded random rho of each batch ("DPO on a random rho fraction")
    top_rs@rho   the rho of each batch with the highest sample reward r_S, no network

for rho in `--ratios` (0.5 and 0.75). The mechanism's own test: the share of flipped pairs among the pairs
each selector chose, against the base rate `--noise` (the selection masks are read off `PairSelector.select`
and lined up with the step's pair indices).

Run from the repository root:  OMP_NUM_THREADS=1 python -m experiments.sams_noise [--seeds 5] [--out DIR]
(one thread: on a busy 2-core machine two OpenMP threads made the scheduler's small matmuls ~100x slower).
Prints one row per arm (mean and standard error over seeds) and writes sams_noise.png and results.json.
Not here: Ray (the Ray path is tested against the oracle in tests/test_sams_training.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch

from experiments.stats import mean_se

SELECTORS = {"sams": "bandit", "random": "random", "top_rs": "top_rs"}
DEFAULT_OUT = Path("runs/experiments/sams_noise")


def arms(ratios: tuple[float, ...]) -> dict[str, dict]:
    """name -> {"clean": train on true labels, "overrides": config keys}."""
    out = {"dpo_clean": {"clean": True, "overrides": []}, "dpo": {"clean": False, "overrides": []}}
    for ratio in ratios:
        for name, selector in SELECTORS.items():
            out[f"{name}@{ratio:g}"] = {"clean": False, "overrides": [
                "sams.enabled=true", f"sams.selector={selector}", f"sams.ratio={ratio}"]}
    return out


def noisy_pairs(n: int, *, noise: float, seed: int) -> tuple[list[dict], list[dict], set[int]]:
    """`n` gold pairs (seeded), the same with round(noise * n) of them flipped, and the flipped indices."""
    from rayalign.tasks.sentiment import gold_pairs

    clean = gold_pairs(n, seed=seed)
    flipped = set(random.Random(seed + 7).sample(range(n), round(noise * n)))
    noisy = [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} if i in flipped else row
             for i, row in enumerate(clean)]
    return clean, noisy, flipped


@torch.no_grad()
def implicit_margins(policy, reference, tokenizer, rows: list[dict], config) -> torch.Tensor:
    """(N,) implicit-reward margins (log pi/ref)(chosen) - (log pi/ref)(rejected) of pair `rows`."""
    from rayalign.oracle import encode_pairs, reference_columns

    encoded = encode_pairs(rows, tokenizer, config).items
    mine = reference_columns(policy, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    ref = reference_columns(reference, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    return (mine["ref_chosen_logps"] - ref["ref_chosen_logps"]) - (mine["ref_rejected_logps"]
                                                                 - ref["ref_rejected_logps"])


def reward_accuracy(policy, reference, tokenizer, rows: list[dict], config) -> float:
    """Held-out implicit-reward accuracy: (log pi/ref)(chosen) > (log pi/ref)(rejected)."""
    return float((implicit_margins(policy, reference, tokenizer, rows, config) > 0).double().mean())


@contextlib.contextmanager
def recorded_selection():
    """Within: every step's pair indices (`rayalign.oracle.step_batches`) and the selector's 0/1 mask over them,
    in call order; yields the list of (indices, mask) it fills."""
    import rayalign.oracle as oracle
    from rayalign.sams_select import PairSelector

    steps, masks = [], []
    original_batches, original_select = oracle.step_batches, PairSelector.select

    def batches(*args, **kwargs):
        for epoch, indices in original_batches(*args, **kwargs):
            steps.append(list(indices))
            yield epoch, indices

    def select(self, **kwargs):
        mask = original_select(self, **kwargs)
        masks.append(mask.tolist())
        return mask

    record: list[tuple[list[int], list[bool]]] = []
    oracle.step_batches, PairSelector.select = batches, select
    try:
        yield record
    finally:
        oracle.step_batches, PairSelector.select = original_batches, original_select
        record.extend(zip(steps, masks))  # a step past the last selection (none here) is left out by zip


def flipped_share(record: list[tuple[list[int], list[bool]]], flipped: set[int]) -> float | None:
    chosen = [i for indices, mask in record for i, keep in zip(indices, mask, strict=True) if keep]
    return sum(i in flipped for i in chosen) / len(chosen) if chosen else None


def run_arm(sft: str, name: str, arm: dict, data: tuple, heldout: list[dict], args, seed: int) -> dict:
    from rayalign.config_loader import load_config
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    clean, noisy, flipped = data
    config = load_config(None, [
        f"model.policy={sft}", f"optim.lr={args.lr}", "optim.scheduler=cosine", "optim.warmup_ratio=0.1",
        f"train.global_batch_size={args.batch}", f"train.epochs={args.epochs}", f"train.seed={seed}",
        "data.max_completion_length=48", *arm["overrides"]])
    torch.manual_seed(seed)
    tokenizer, policy = load_tokenizer(sft), load_model(sft)
    reference = copy.deepcopy(policy).requires_grad_(False)
    started = time.perf_counter()
    with recorded_selection() as record:
        history = train_pairs(policy, reference, tokenizer, clean if arm["clean"] else noisy, config)
    seconds = time.perf_counter() - started
    selected = sum(mask.count(True) for _, mask in record) if record else len(noisy) * args.epochs
    return {"arm": name, "seed": seed, "heldout_accuracy": reward_accuracy(policy, reference, tokenizer, heldout,
                                                                            config),
            "flipped_share": flipped_share(record, flipped) if record else None, "steps": len(history),
            "backward_pairs": int(selected), "seconds": round(seconds, 1)}


def summarise(results: list[dict], names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        mine = [r for r in results if r["arm"] == name]
        accuracy, accuracy_se = mean_se([r["heldout_accuracy"] for r in mine])
        share, share_se = mean_se([r["flipped_share"] for r in mine])
        rows.append({"arm": name, "accuracy": accuracy, "accuracy_se": accuracy_se, "flipped_share": share,
                     "flipped_share_se": share_se, "backward_pairs": mine[0]["backward_pairs"],
                     "seconds": statistics.mean(r["seconds"] for r in mine), "seeds": len(mine)})
    return rows


def plot(summary: list[dict], results: list[dict], noise: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["arm"] for row in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for x, row in enumerate(summary):
        values = [r["heldout_accuracy"] for r in results if r["arm"] == row["arm"]]
        left.scatter([x] * len(values), values, alpha=0.5, s=14)
        left.errorbar(x, row["accuracy"], yerr=row["accuracy_se"], fmt="_", color="black", ms=18, capsize=4)
        if row["flipped_share"] == row["flipped_share"]:
            right.bar(x, row["flipped_share"], yerr=row["flipped_share_se"], color="tab:red", alpha=0.7, capsize=4)
    left.set(ylabel="held-out reward accuracy", title="per seed (dots), mean ± s.e. (bar)")
    right.axhline(noise, color="grey", ls="--", lw=1, label=f"base rate {noise:g}")
    right.set(ylabel="flipped share of the chosen pairs", title="what each selector trained on")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=768)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--sft-examples", type=int, default=800)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from rayalign.config_loader import load_config
    from rayalign.loop import build_task_sft
    from rayalign.stage_storage import StageStorage
    from rayalign.tasks.sentiment import gold_pairs

    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(None, [f"loop.sft_examples={args.sft_examples}"])
    sft = str(build_task_sft(config, args.out, StageStorage(config)))
    heldout, plan, results, began = gold_pairs(args.heldout, seed=10_000), arms(tuple(args.ratios)), [], time.time()
    for seed in range(args.seeds):
        data = noisy_pairs(args.pairs, noise=args.noise, seed=seed)
        for name, arm in plan.items():
            results.append(run_arm(sft, name, arm, data, heldout, args, seed))
            print(json.dumps(results[-1]), flush=True)
    summary = summarise(results, list(plan))
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "summary": summary, "runs": results}, indent=2) + "\n")
    plot(summary, results, args.noise, args.out / "sams_noise.png")
    print(f"\n{'arm':12} {'accuracy':>16} {'flipped share':>16} {'backward pairs':>15} {'s/run':>6}  "
          f"({args.seeds} seeds, {time.time() - began:.0f} s)")
    for row in summary:
        print(f"{row['arm']:12} {row['accuracy']:8.3f} ± {row['accuracy_se']:.3f} {row['flipped_share']:8.3f} ± "
              f"{row['flipped_share_se']:.3f} {row['backward_pairs']:15d} {row['seconds']:6.1f}")
    return summary


if __name__ == "__main__":
    main()
