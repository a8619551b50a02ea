"""Evaluation metrics of a policy's samples on the held-out prompts, against baselines.

The samples come from the loop's shared Ray Data pass (`rayalign.loop.sample_model`: Generator actors on
the evaluation prompts with fixed ids, so every model gets the same per-prompt seeds, then Judge actors
that score each sample under the model and under pi_SFT), stored as `RUN_DIR/eval/<name>.parquet`.
From those rows: the KL estimate E_pi[log pi - log pi_SFT]; with a task that has a gold reward, each
prompt's score is the mean gold reward of its samples, and win rates compare those scores prompt by
prompt (ties count one half). With eval.reward_model the same metrics by that model's rewards (the
`rm_rewards` column the Judge actors fill), under their own keys so both can be reported side by side:

    gold reward (loop.task=sentiment)     reward model (eval.reward_model)
    gold_reward_mean                      rm/reward_mean
    win_rate_vs_<baseline>                rm/win_rate_vs_<baseline>

No sampling and no training here.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

RM_PREFIX = "rm/"  # the reward model's metrics: rm/reward_mean, rm/win_rate_vs_<baseline>


def prompt_scores(rows: pd.DataFrame, column: str = "gold_rewards") -> torch.Tensor:
    """Mean reward of each prompt's samples (per-sample rewards in list column `column`), (P,)."""
    return torch.tensor([sum(r) / len(r) for r in rows[column]], dtype=torch.float64)


def kl_to_sft(rows: pd.DataFrame) -> float:
    """The k1 estimate of KL(pi || pi_SFT) on pi's own samples, in nats per completion."""
    from rayalign.core.metrics import sequence_kl_estimate

    policy = torch.tensor([v for r in rows["policy_logps"] for v in r], dtype=torch.float64)
    sft = torch.tensor([v for r in rows["sft_logps"] for v in r], dtype=torch.float64)
    return float(sequence_kl_estimate(policy, sft))


def _compare(rows: pd.DataFrame, baselines: dict[str, pd.DataFrame], *, column: str, mean_key: str,
             prefix: str) -> dict[str, float]:
    from rayalign.core.metrics import win_rate

    scores = prompt_scores(rows, column)
    out = {mean_key: float(scores.mean())}
    for name, baseline in baselines.items():
        out[f"{prefix}win_rate_vs_{name}"] = float(win_rate(scores, prompt_scores(baseline, column)))
    return out


def compare(rows: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> dict[str, float]:
    """gold_reward_mean, and win_rate_vs_<name> against each baseline's samples on the same prompts."""
    return _compare(rows, baselines, column="gold_rewards", mean_key="gold_reward_mean", prefix="")


def compare_rm(rows: pd.DataFrame, baselines: dict[str, pd.DataFrame]) -> dict[str, float]:
    """rm/reward_mean and rm/win_rate_vs_<name>: `compare` by eval.reward_model's rewards (`rm_rewards`)."""
    from rayalign.reward_judge import EVAL_REWARDS

    return _compare(rows, baselines, column=EVAL_REWARDS, mean_key=f"{RM_PREFIX}reward_mean", prefix=RM_PREFIX)


def gold_agreement(judged: pd.DataFrame, gold_reward: Callable[[str], float]) -> list[bool | None]:
    """Per judged pair: whether the gold reward prefers its chosen side (None where the gold reward ties)."""
    gold = [(gold_reward(c), gold_reward(r)) for c, r in zip(judged["chosen"], judged["rejected"])]
    return [None if c == r else c > r for c, r in gold]


def judge_accuracy(judged: pd.DataFrame, gold_reward: Callable[[str], float]) -> float | None:
    """Agreement of self-judged pairs with the gold preference, over pairs the gold reward does not tie."""
    decided = [agree for agree in gold_agreement(judged, gold_reward) if agree is not None]
    return sum(decided) / len(decided) if decided else None
