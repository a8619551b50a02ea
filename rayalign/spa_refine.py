"""SPA self-refinement state on the training workers: the rolling margin window and its threshold.

Each optimizer step reads tau from the window (0 until it holds `spa.window` margins), applies soft labels
to pairs at or below it once past the warm start, and afterwards appends the step's margins, gathered
from every worker in global batch order, so the rule does not depend on the worker count (ALGORITHMS.md
§5). The window belongs to one iteration's training run and is saved in its checkpoints. The math is in
`rayalign.core.spa`; this only keeps the state and moves margins between workers.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rayalign.config import SpaConfig
from rayalign.core.spa import MarginWindow
from rayalign.step import RefineSettings


class SpaRefiner:
    def __init__(self, config: SpaConfig, *, mix: float, beta_total_steps: int):
        self.config, self.mix = config, mix
        self.window = MarginWindow(config.window)
        self.warm_steps = math.ceil(config.warm_start * beta_total_steps)
        self._pending: list[tuple[int, float]] = []

    def settings(self, step: int) -> RefineSettings:
        """This step's settings; `step` is the 0-based optimizer step of the run."""
        return RefineSettings(mix=self.mix, threshold=self.window.threshold(k_fraction=self.config.k_fraction),
                              alpha=self.config.alpha, active=step >= self.warm_steps)

    def record(self, pair_indices: list[int], margins: torch.Tensor) -> None:
        self._pending.extend(zip(pair_indices, margins.detach().double().cpu().tolist()))

    def end_step(self, batch_order: list[int]) -> None:
        """Gather every worker's margins, order them as the global batch is ordered, extend the window."""
        pending, self._pending = self._pending, []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, pending)
            pending = [item for part in gathered for item in part]
        position = {pair: i for i, pair in enumerate(batch_order)}
        self.window.extend([margin for _, margin in sorted(pending, key=lambda item: position[item[0]])])

    def state_dict(self) -> dict:
        return self.window.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.window.load_state_dict(state)
