"""MallowsPO-theta vs DPO as the Ray Tune sweep of `configs/tune_mallows.yaml`, from an SFT'd tiny model.

The shipped sweep starts from a random tiny Llama and every trial ends at 0.58-0.60 held-out accuracy: a
random model's implicit reward says nothing. Here, as the MallowsPO paper does (Chen et al., ICLR 2025;
ALGORITHMS.md §2), the policy is SFT'd first:
  1. the HH-RLHF harmless-base pairs (`../shared/data/hh-rlhf/`) are split once (seeded): --test-fraction of
     them are the held-out test pairs, no SFT or training row comes from them;
  2. a tiny Llama and its tokenizer are built from the training pairs' texts and SFT'd on their chosen
     responses (`rayalign.sft.run_sft`) -> pi_SFT, the policy and the reference of every trial;
  3. the sweep: `configs/tune_mallows.yaml` with the training pairs as data.train_file, the test pairs as
     data.eval_file, model.policy = pi_SFT, and a learning-rate grid for a 2-layer, 64-wide model (the paper's
     5e-7..1e-6 RMSprop rates are for 7B models and move this one by nothing): DPO vs MallowsPO-theta over
     beta x lr, one epoch each, run by `rayalign.tune.run_tune` (what `rayalign tune` runs);
  4. every trial's final model is scored on every test pair: the implicit-reward margin
     (log pi/ref)(chosen) - (log pi/ref)(rejected) > 0 is a correct pair. Accuracy ± its standard error over
     test pairs (binomial), and per (beta, lr) the paired difference MallowsPO - DPO on the same pairs with
     its standard error (sd of the per-pair differences / sqrt(n)).
One seed: the trials differ in loss and hyper-parameters only; the standard errors are over the test pairs.

Run from the repository root (needs the shared data):  python -m experiments.mallows_sweep [--out DIR]
Writes OUT/{data/, tiny-model/, sft/, sweep.yaml, sweep/tune/ (Tune's outputs), results.json,
mallows_sweep.png} and prints the table. Not here: new training code (every trial is a `rayalign train` run).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from experiments.common import save_figure, save_results

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
DEFAULT_OUT = Path("runs/experiments/mallows_sweep")
SWEEP = Path(__file__).resolve().parents[1] / "configs" / "tune_mallows.yaml"


def log(message: str) -> None:
    print(f"mallows_sweep: {message}", flush=True)


def prepare(out: Path, *, source: Path, test_fraction: float, seed: int, sft_epochs: int, sft_lr: float,
            limit: int | None = None) -> dict[str, Path]:
    """Split the pairs, build the tiny model from the training texts and SFT it; existing outputs are kept."""
    from rayalign.data import load_rows
    from rayalign.io import atomic_directory, atomic_write_text
    from rayalign.sft import run_sft
    from rayalign.tiny import make_tiny_model

    paths = {name: out / "data" / f"{name}.jsonl" for name in ("train", "test", "corpus")}
    paths.update(tiny=out / "tiny-model", sft=out / "sft")
    loaded = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in load_rows(source).rows][:limit]
    # a few HH responses are blank: an explicit pair may not have one (rayalign.data rejects it), so drop them
    rows = [r for r in loaded if r["chosen"].strip() and r["rejected"].strip()]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = int(len(rows) * test_fraction)
    split = {"test": [rows[i] for i in sorted(order[:held])], "train": [rows[i] for i in sorted(order[held:])]}
    texts = [{"text": r["prompt"] + r[side]} for r in split["train"] for side in ("chosen", "rejected")]
    for name, content in (*split.items(), ("corpus", texts)):
        if not paths[name].exists():
            atomic_write_text(paths[name], "".join(json.dumps(r) + "\n" for r in content))
    if not (paths["tiny"] / "config.json").exists():
        with atomic_directory(paths["tiny"]) as tmp:
            make_tiny_model(tmp, corpus=paths["corpus"], seed=seed)
    if not (paths["sft"] / "config.json").exists():
        examples = [(r["prompt"], r["chosen"]) for r in split["train"]]
        run_sft(str(paths["tiny"]), examples, paths["sft"], epochs=sft_epochs, lr=sft_lr, seed=seed,
                max_length=192, log=log)
    log(f"{len(split['train'])} training pairs, {len(split['test'])} test pairs ({len(loaded) - len(rows)} pairs "
        f"with a blank response dropped), pi_SFT in {paths['sft']}")
    return paths


def sweep_yaml(out: Path, paths: dict[str, Path], *, lrs: list[float], betas: list[float],
               extra: dict | None = None) -> Path:
    """The shipped sweep's YAML with this experiment's data, pi_SFT and grid (written to OUT/sweep.yaml)."""
    import yaml

    from rayalign.io import atomic_write_text

    tree = yaml.safe_load(SWEEP.read_text())
    tree["data"].update(train_file=str(paths["train"]), eval_file=str(paths["test"]), eval_fraction=0.0)
    tree.setdefault("model", {})["policy"] = str(paths["sft"])
    tree["tune"]["space"].update({"loss.beta": {"grid": betas}, "optim.lr": {"grid": lrs}})
    for section, values in (extra or {}).items():
        tree.setdefault(section, {}).update(values)
    return atomic_write_text(out / "sweep.yaml", yaml.safe_dump(tree, sort_keys=False))


def trials(tune_dir: Path) -> list[dict]:
    """Every trial of results.csv: its swept values and its run directory."""
    import csv

    with open(tune_dir / "results.csv") as f:
        return [{"trial": row["trial"], "loss": row["loss.type"], "beta": float(row["loss.beta"]),
                 "lr": float(row["optim.lr"]), "dir": Path(row["trial dir"])} for row in csv.DictReader(f)]


@torch.no_grad()
def correct_pairs(model_dir: Path, reference, tokenizer, rows: list[dict], config) -> torch.Tensor:
    """(N,) 1.0 where the model's implicit-reward margin over `reference` ranks the pair right, else 0.0."""
    from experiments.sams_noise import implicit_margins
    from rayalign.models import load_model

    return (implicit_margins(load_model(str(model_dir)), reference, tokenizer, rows, config) > 0).double()


def summarise(scored: list[dict]) -> list[dict]:
    """One row per (beta, lr): each loss's accuracy ± s.e. and the paired MallowsPO - DPO difference."""
    cells = {}
    for trial in scored:
        correct = torch.tensor(trial["correct"], dtype=torch.float64)
        cells.setdefault((trial["beta"], trial["lr"]), {})[trial["loss"]] = correct
    rows = []
    for (beta, lr), by_loss in sorted(cells.items()):
        row = {"beta": beta, "lr": lr}
        for loss, correct in by_loss.items():
            p = float(correct.mean())
            row[loss] = (p, (p * (1 - p) / len(correct)) ** 0.5)
        if {"dpo", "mallows_theta"} <= set(by_loss):
            diff = by_loss["mallows_theta"] - by_loss["dpo"]
            row["diff"] = (float(diff.mean()), float(diff.std()) / len(diff) ** 0.5)
        rows.append(row)
    return rows


def table(rows: list[dict], n: int) -> str:
    lines = [f"held-out implicit-reward accuracy on {n} test pairs, mean ± s.e. (binomial; difference paired)",
             f"{'beta':>6} {'lr':>8} {'DPO':>15} {'MallowsPO-theta':>17} {'Mallows - DPO':>16}"]
    for row in rows:
        cell = {k: f"{row[k][0]:.3f} ± {row[k][1]:.3f}" if k in row else "-" for k in ("dpo", "mallows_theta")}
        diff = f"{row['diff'][0]:+.3f} ± {row['diff'][1]:.3f}" if "diff" in row else "-"
        lines.append(f"{row['beta']:>6g} {row['lr']:>8.0e} {cell['dpo']:>15} {cell['mallows_theta']:>17} {diff:>16}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"b={r['beta']:g}\nlr={r['lr']:.0e}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.2))
    for offset, (loss, color) in zip((-0.18, 0.18), (("dpo", "C0"), ("mallows_theta", "C3"))):
        xs = [i + offset for i, r in enumerate(rows) if loss in r]
        left.errorbar(xs, [r[loss][0] for r in rows if loss in r], yerr=[r[loss][1] for r in rows if loss in r],
                      fmt="o", color=color, capsize=3, label=loss)
    paired = [(i, r["diff"]) for i, r in enumerate(rows) if "diff" in r]
    right.bar([i for i, _ in paired], [d[0] for _, d in paired], yerr=[d[1] for _, d in paired], color="C3",
              alpha=0.7, capsize=3)
    right.axhline(0, color="grey", lw=0.8)
    left.set(ylabel="held-out reward accuracy", title="each trial, ± s.e. over test pairs")
    right.set(ylabel="MallowsPO-theta - DPO (paired)", title="difference on the same test pairs, ± s.e.")
    for ax in (left, right):
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    left.legend()
    return save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=HH)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs (toy runs)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-epochs", type=int, default=3)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra overrides written into the sweep's YAML (toy runs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def _extra(pairs: list[str]) -> dict:
    import yaml

    extra: dict = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        section, name = key.split(".", 1)
        extra.setdefault(section, {})[name] = yaml.safe_load(value)
    return extra


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from rayalign.config_loader import load_config
    from rayalign.models import load_model, load_tokenizer
    from rayalign.tune import run_tune

    if not args.source.exists():
        raise SystemExit(f"mallows_sweep: {args.source} not found (the HH-RLHF pairs of ../shared/data)")
    args.out = args.out.resolve()  # Ray Train workers do not run in this directory
    began = time.time()
    paths = prepare(args.out, source=args.source, test_fraction=args.test_fraction, seed=args.seed,
                    sft_epochs=args.sft_epochs, sft_lr=args.sft_lr, limit=args.limit)
    config = load_config(sweep_yaml(args.out, paths, lrs=args.lrs, betas=args.betas, extra=_extra(args.set)),
                         [f"run.dir={args.out / 'sweep'}"])
    tune_dir = args.out / "sweep" / "tune"
    if not (tune_dir / "results.csv").exists() and run_tune(config, resume=(tune_dir / "experiment").exists()):
        raise SystemExit("mallows_sweep: the sweep failed (see above); rerun to resume it")
    test = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    tokenizer, reference = load_tokenizer(str(paths["sft"])), load_model(str(paths["sft"])).requires_grad_(False)
    scored = [{**{k: v for k, v in t.items() if k != "dir"},
               "correct": correct_pairs(t["dir"] / "final", reference, tokenizer, test, config).tolist()}
              for t in trials(tune_dir)]
    rows = summarise(scored)
    save_results(args.out / "results.json", args, summary=rows, trials=scored)
    print(table(rows, len(test)))
    log(f"plot {plot(rows, args.out / 'mallows_sweep.png')}; {time.time() - began:.0f} s")
    return rows


if __name__ == "__main__":
    main()
