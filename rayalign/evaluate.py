"""Evaluation metrics of a policy's samples on the held-out prompts, against baselines.

The samples come from the loop's shared Ray Data pass (`rayalign.loop.sample_model`: Generator actors on
the evaluation prompts with fixed ids, so every model gets the same per-prompt seeds, then Judge actors
that score each sample under the model and under pi_SFT), stored as `RUN_DIR/eval/<name>.parquet`.
From those rows: the KL estimate E_pi[log pi - log pi_SFT]; with a task that has a gold reward, each
prompt's score is the mean gold reward of its samples, and win rates compare those scores prompt by
prompt (ties count one half). No sampling and no training here.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch


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
