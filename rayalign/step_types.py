"""The values one micro-batch step takes and returns, shared by the pair step (`rayalign.step`) and the
group step (`rayalign.group_step`) so that neither imports the other. Plain dataclasses, no logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RefineSettings:
    """SPA self-refinement for this optimizer step (ALGORITHMS.md §5): mix = 1 + lambda, threshold tau."""

    mix: float
    threshold: float
    alpha: float
    active: bool  # past the warm start



@dataclass
class MicroBatchOutput:
    """Per-example losses (B,) with gradient, and the detached values the metrics need."""

    losses: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    tokens: int
    refine_margins: torch.Tensor | None = None  # SPA: (B,) confidence margins, for the threshold window
    relabelled: int = 0  # SPA: pairs given a soft label
    context: torch.Tensor | None = None  # SamS: (B, L, D) context of the pairs, when asked
    level_logps: torch.Tensor | None = None  # GDPO-format rows: (B, L) level-digit log-probs, detached
