"""The evaluation stage: sample from a policy on held-out prompts and score it against baselines.

One Ray Data pass per model: `Generator` actors sample on the evaluation prompts (a fixed seed, so every
model sees the same prompts and sampling noise), then `Judge` actors compute each sample's log-prob under
the model and under pi_SFT, which gives the KL estimate E_pi[log pi - log pi_SFT]. With a task that has a
gold reward, each prompt's score is the mean gold reward of its samples, and win rates compare those
scores prompt by prompt (ties count one half). Samples are kept under `RUN_DIR/eval/<name>.parquet`, so
a baseline is sampled once. No training here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from rayalign.config import Config

EVAL_SEED = 12_345  # distinct from every iteration's generation seed


def sample_and_score(model_path: str, sft_path: str, prompts: list[str], config: Config, out_path: Path,
                     gold_reward: Callable[[str], float] | None) -> pd.DataFrame:
    """Per-prompt rows: texts, policy/sft log-probs and (with a task) gold rewards; cached at `out_path`."""
    from rayalign.data import write_rows_parquet
    from rayalign.generate import generation_dataset
    from rayalign.judge import judge_dataset

    if out_path.exists():
        return pd.read_parquet(out_path)
    generate = dataclasses.replace(config.generate, seed=EVAL_SEED)
    dataset = generation_dataset(prompts, model_path, generate, dtype=config.model.dtype)
    rows = judge_dataset(dataset, policy_path=model_path, sft_path=sft_path, config=config).to_pandas()
    rows = rows.sort_values("prompt_id").reset_index(drop=True)
    if gold_reward is not None:
        rows["gold_rewards"] = [[gold_reward(t) for t in texts] for texts in rows["texts"]]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_rows_parquet(rows.to_dict("records"), out_path)
    return rows


def prompt_scores(rows: pd.DataFrame) -> torch.Tensor:
    """Mean gold reward of each prompt's samples, (P,)."""
    return torch.tensor([sum(r) / len(r) for r in rows["gold_rewards"]], dtype=torch.float64)


def kl_to_sft(rows: pd.DataFrame) -> float:
    """The k1 estimate of KL(pi || pi_SFT) on pi's own samples, in nats per completion."""
    from rayalign.core.metrics import sequence_kl_estimate

    policy = torch.tensor([v for r in rows["policy_logps"] for v in r], dtype=torch.float64)
    sft = torch.tensor([v for r in rows["sft_logps"] for v in r], dtype=torch.float64)
    return float(sequence_kl_estimate(policy, sft))


def compare(rows: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> dict[str, float]:
    """gold_reward_mean, and win_rate_vs_<name> against each baseline's samples on the same prompts."""
    from rayalign.core.metrics import win_rate

    scores = prompt_scores(rows)
    out = {"gold_reward_mean": float(scores.mean())}
    for name, baseline in baselines.items():
        out[f"win_rate_vs_{name}"] = float(win_rate(scores, prompt_scores(baseline)))
    return out


def judge_accuracy(judged: pd.DataFrame, gold_reward: Callable[[str], float]) -> float | None:
    """Agreement of self-judged pairs with the gold preference, over pairs the gold reward does not tie."""
    decided = [(gold_reward(c), gold_reward(r)) for c, r in zip(judged["chosen"], judged["rejected"])]
    decided = [(c, r) for c, r in decided if c != r]
    return sum(c > r for c, r in decided) / len(decided) if decided else None
