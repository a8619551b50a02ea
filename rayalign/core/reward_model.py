"""Reward-model math: the Bradley–Terry pairwise loss a scalar reward model is fitted with, and how its
scores of a prompt's K samples become a judgment.

A reward model r_φ(x, y) is a sequence classifier with one output (ALGORITHMS.md §1: the Bradley–Terry
model DPO is derived from). Fitting it maximises log σ(r_φ(x, y_w) − r_φ(x, y_l)) over labelled pairs
(Ouyang et al. 2022, Eq. 1; Stiennon et al. 2020). Judging with it is SPA's selection with the explicit
reward in place of the implicit one: chosen = argmax_k r_φ(x, y_k), rejected = argmin_k (the iterative
DPO-with-RM baseline of Xiong et al. 2024 / Dong et al. 2024), and σ(r_w − r_l) is the Bradley–Terry
probability of that preference, the same confidence SPA keeps.

What is not here: tokenisation, model calls, dropping empty or identical pairs (the judge stage compares
texts), any configuration. Torch and the standard library only.
"""

import torch
import torch.nn.functional as F

from rayalign.core.spa import JudgeOutput, judge_pairs

__all__ = ["bradley_terry_loss", "reward_model_judgment"]


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per-pair −log σ(r_w − r_l): (B,), (B,) -> (B,). Take the mean for the batch loss.

    Ouyang et al. 2022 (InstructGPT), Eq. 1, with one pair per prompt. `logsigmoid` keeps it finite for
    large negative margins (log(sigmoid(·)) would underflow to −inf).
    """
    return -F.logsigmoid(chosen_scores - rejected_scores)


def reward_model_judgment(scores: torch.Tensor) -> JudgeOutput:
    """A prompt's best vs worst sample by reward-model score: (P, K) -> `JudgeOutput` of (P,) tensors.

    Exactly `judge_pairs` on the scores (first index on ties, `tied` where all K scores are equal), so the
    two judges differ only in the reward they rank by; the margin r_w − r_l gives the confidence σ(margin).
    """
    return judge_pairs(scores)
