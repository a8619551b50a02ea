"""SamS under label noise (ALGORITHMS.md §6, the paper's 20%-flipped setting) on the quickstart task.

A tiny Llama is SFT'd once on the sentiment task's reviews (`rayalign.loop.build_task_sft`). For each seed,
`--pairs` gold pairs are drawn and `--noise` of them get chosen and rejected swapped; every method then
trains from the same SFT model, with the same optimizer steps (batch `--batch` pairs, `--epochs` epochs),
through `rayalign.oracle.train_pairs` (the single-process trainer that shares its step with the Ray
workers) and is scored on `--heldout` clean pairs: implicit-reward accuracy, the spec's "test accuracy".

    dpo          every pair of the batch gets a backward pass
    sams         the SamS bandit chooses rho of each batch (sams.selector=bandit)
    random       a seeded random rho of each batch ("DPO on a random rho fraction")
    top_rs       the rho of each batch with the highest sample reward r_S, no network

Run from the repository root:  OMP_NUM_THREADS=1 python -m experiments.sams_noise [--seeds 5] [--out DIR]
(one thread: on a busy 2-core machine two OpenMP threads made the scheduler's small matmuls ~100x slower;
with it, a run of 48 steps takes ~5 s for DPO and ~15 s with the bandit).
Prints one row per method (mean, spread, backward passes) and writes sams_noise.png and results.json.
Not here: Ray (the Ray path is tested against the oracle in tests/test_sams_training.py) and memory figures
(`sams.regrad=true` is what saves activation memory; the oracle computes the same gradients either way).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path

import torch

METHODS = {"dpo": [], "sams": ["sams.enabled=true"], "random": ["sams.enabled=true", "sams.selector=random"],
           "top_rs": ["sams.enabled=true", "sams.selector=top_rs"]}
DEFAULT_OUT = Path("runs/experiments/sams_noise")


def noisy_pairs(n: int, *, noise: float, seed: int) -> tuple[list[dict], int]:
    """`n` gold pairs with round(noise * n) of them flipped (seeded); returns the rows and the flip count."""
    from rayalign.tasks.sentiment import gold_pairs

    rows = gold_pairs(n, seed=seed)
    flipped = random.Random(seed + 7).sample(range(n), round(noise * n))
    for i in flipped:
        rows[i] = {**rows[i], "chosen": rows[i]["rejected"], "rejected": rows[i]["chosen"]}
    return rows, len(flipped)


@torch.no_grad()
def reward_accuracy(policy, reference, tokenizer, rows: list[dict], config) -> float:
    """Held-out implicit-reward accuracy: (log pi/ref)(chosen) > (log pi/ref)(rejected)."""
    from rayalign.oracle import encode_pairs, reference_columns

    encoded = encode_pairs(rows, tokenizer, config).items
    mine = reference_columns(policy, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    ref = reference_columns(reference, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    margin = (mine["ref_chosen_logps"] - ref["ref_chosen_logps"]) - (mine["ref_rejected_logps"]
                                                                     - ref["ref_rejected_logps"])
    return float((margin > 0).double().mean())


def run_method(sft: str, method: str, rows: list[dict], heldout: list[dict], args, seed: int) -> dict:
    from rayalign.config_loader import load_config
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    config = load_config(None, [
        f"model.policy={sft}", f"optim.lr={args.lr}", "optim.scheduler=cosine", "optim.warmup_ratio=0.1",
        f"train.global_batch_size={args.batch}", f"train.epochs={args.epochs}", f"train.seed={seed}",
        f"sams.ratio={args.ratio}", "data.max_completion_length=48", *METHODS[method]])
    torch.manual_seed(seed)
    tokenizer, policy = load_tokenizer(sft), load_model(sft)
    reference = copy.deepcopy(policy).requires_grad_(False)
    started = time.perf_counter()
    history = train_pairs(policy, reference, tokenizer, rows, config)
    seconds = time.perf_counter() - started
    # pairs that got a backward pass: every pair for DPO, the selected ones otherwise
    backward = len(rows) * args.epochs if method == "dpo" else sum(h["sams/selected"] for h in history)
    return {"method": method, "seed": seed, "heldout_accuracy": reward_accuracy(policy, reference, tokenizer,
                                                                                 heldout, config),
            "train_accuracy": history[-1]["rewards/accuracies"], "steps": len(history),
            "backward_pairs": int(backward), "seconds": round(seconds, 1)}


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for method in METHODS:
        mine = [r for r in results if r["method"] == method]
        accuracy = [r["heldout_accuracy"] for r in mine]
        rows.append({"method": method, "mean": statistics.mean(accuracy),
                     "stdev": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                     "min": min(accuracy), "max": max(accuracy), "backward_pairs": mine[0]["backward_pairs"],
                     "seconds": statistics.mean(r["seconds"] for r in mine)})
    return rows


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for x, method in enumerate(METHODS):
        values = [r["heldout_accuracy"] for r in results if r["method"] == method]
        ax.scatter([x] * len(values), values, alpha=0.7)
        ax.hlines(statistics.mean(values), x - 0.25, x + 0.25, color="black")
    ax.set_xticks(range(len(METHODS)), list(METHODS))
    ax.set_ylabel("held-out reward accuracy")
    ax.set_title("20% flipped labels: per seed (dots) and mean (bar)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--heldout", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from rayalign.config_loader import load_config
    from rayalign.loop import build_task_sft
    from rayalign.stage_storage import StageStorage
    from rayalign.tasks.sentiment import gold_pairs

    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(None, ["loop.sft_examples=800"])
    sft = str(build_task_sft(config, args.out, StageStorage(config)))
    heldout = gold_pairs(args.heldout, seed=10_000)
    results = []
    for seed in range(args.seeds):
        rows, flipped = noisy_pairs(args.pairs, noise=args.noise, seed=seed)
        for method in METHODS:
            results.append(run_method(sft, method, rows, heldout, args, seed))
            print(json.dumps({**results[-1], "flipped": flipped}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "sams_noise.png")
    print(f"\n{'method':8} {'mean':>6} {'stdev':>6} {'min':>6} {'max':>6} {'backward pairs':>15} {'s/run':>6}")
    for row in summarise(results):
        print(f"{row['method']:8} {row['mean']:6.3f} {row['stdev']:6.3f} {row['min']:6.3f} {row['max']:6.3f} "
              f"{row['backward_pairs']:15d} {row['seconds']:6.1f}")


if __name__ == "__main__":
    main()
