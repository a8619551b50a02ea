"""`rayalign run`: what the main job is until the on-policy loop lands.

Today it is the offline half of the quickstart, end to end on a laptop CPU with nothing downloaded:
build the tiny model and tokenizer on the task corpus (unless `model.policy` names one), write the
gold-labelled seed pairs of the sentiment task (unless `data.train_file` names a file, which is then
validated exactly like `rayalign data check`), train DPO-family losses in-process (`rayalign.oracle`),
and report the held-out implicit-reward accuracy of the result. Outputs under RUN_DIR:
`config.yaml`, `metrics.jsonl` (one object per step, TRL's names), `summary.json`, `final/`.

It does not generate, judge, schedule or use Ray yet; those are the loop's stages.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

from rayalign.config import Config
from rayalign.io import atomic_directory, atomic_write_text

SEED_PAIRS, HELD_OUT_PAIRS, CORPUS_DOCS = 128, 64, 2000


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _prepare_model(config: Config, run_dir: Path) -> str:
    if config.model.policy:
        return config.model.policy
    from rayalign.tasks.sentiment import sft_corpus
    from rayalign.tiny import make_tiny_model

    corpus = _write_jsonl(run_dir / "data" / "corpus.jsonl",
                          [{"text": t} for t in sft_corpus(CORPUS_DOCS, seed=config.data.seed)])
    out = run_dir / "tiny-model"
    if not (out / "config.json").exists():
        with atomic_directory(out) as tmp:
            make_tiny_model(tmp, corpus=corpus, seed=config.train.seed)
    return str(out)


def _prepare_data(config: Config, run_dir: Path, tokenizer) -> tuple[list[dict], list[dict]]:
    from rayalign.data import load_rows

    if config.data.train_file:
        train = load_rows(config.data.train_file, fmt=config.data.format, tokenizer=tokenizer).rows
        if config.data.eval_file:
            return train, load_rows(config.data.eval_file, fmt=config.data.format, tokenizer=tokenizer).rows
        rng = random.Random(config.data.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        held = int(len(train) * config.data.eval_fraction)
        return [train[i] for i in order[held:]], [train[i] for i in order[:held]]
    from rayalign.tasks.sentiment import gold_pairs

    pairs = gold_pairs(SEED_PAIRS + HELD_OUT_PAIRS, seed=config.data.seed)
    train_path = _write_jsonl(run_dir / "data" / "seed_pairs.jsonl", pairs[:SEED_PAIRS])
    eval_path = _write_jsonl(run_dir / "data" / "held_out_pairs.jsonl", pairs[SEED_PAIRS:])
    return load_rows(train_path, tokenizer=tokenizer).rows, load_rows(eval_path, tokenizer=tokenizer).rows


def held_out_accuracy(policy, reference, tokenizer, rows: list[dict], config: Config) -> float | None:
    """Fraction of pairs whose implicit reward beta * log(pi / pi_ref) ranks chosen above rejected."""
    if not rows:
        return None
    from rayalign.oracle import encode_pairs, reference_columns

    encoded = encode_pairs(rows, tokenizer, config).items
    pol = reference_columns(policy, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    ref = reference_columns(reference, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    margin = ((pol["ref_chosen_logps"] - ref["ref_chosen_logps"])
              - (pol["ref_rejected_logps"] - ref["ref_rejected_logps"]))
    return float((margin > 0).float().mean())


def run_quickstart(config: Config) -> int:
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import encode_pairs, train_pairs

    started = time.perf_counter()
    run_dir = Path(config.run.dir)
    torch.manual_seed(config.train.seed)
    policy_path = _prepare_model(config, run_dir)
    tokenizer = load_tokenizer(config.model.tokenizer or policy_path, trust_remote_code=config.model.trust_remote_code)
    policy = load_model(policy_path, trust_remote_code=config.model.trust_remote_code, dtype=config.model.dtype)
    reference = (load_model(config.model.reference, dtype=config.model.dtype) if config.model.reference
                 else copy.deepcopy(policy))
    reference.requires_grad_(False)
    train_rows, eval_rows = _prepare_data(config, run_dir, tokenizer)
    stats = encode_pairs(train_rows, tokenizer, config)
    print(f"rayalign run: {len(train_rows)} training pairs, {len(eval_rows)} held out "
          f"({stats.prompts_truncated} prompts and {stats.completions_truncated} pairs' completions truncated); "
          f"loss {config.loss.type}, run dir {run_dir}", flush=True)
    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)

    def log_step(metrics: dict) -> None:
        with open(metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")
        print(f"  step {metrics['step']:>4}  loss {metrics['loss']:.4f}  "
              f"acc {metrics['rewards/accuracies']:.3f}  margin {metrics['rewards/margins']:+.4f}  "
              f"lr {metrics['lr']:.2e}", flush=True)

    history = train_pairs(policy, reference, tokenizer, train_rows, config, on_step=log_step)
    after = held_out_accuracy(policy, reference, tokenizer, eval_rows, config)
    with atomic_directory(run_dir / "final") as tmp:
        policy.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    summary = {"steps": len(history), "held_out_reward_accuracy": after,
               "final_train_loss": history[-1]["loss"] if history else None,
               "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"rayalign run: done in {summary['seconds']} s; held-out reward accuracy {after}; "
          f"final model in {run_dir / 'final'}", file=sys.stdout)
    return 0
