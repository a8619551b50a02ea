"""SamS on the trainers: gather a step's per-pair numbers in global order, choose the pairs, share the choice.

Every worker forwards its shard of the global batch once (with hidden states); `PairSelector.select`
sums each worker's slice into full-batch tensors (an all-reduce of zero-filled tensors, so every worker
sees the batch in the order the oracle sees it), lets rank 0 choose, and all-reduces the 0/1 mask back:
the selection is global and the same on every worker (ALGORITHMS.md §6). Three selectors:

    bandit   the SamS contextual bandit (`rayalign.core.sams.SamsScheduler`), state on rank 0 only
    random   a seeded uniform ratio of each batch ("DPO on a random rho fraction")
    top_rs   the K pairs with the highest sample reward r_S, computed directly (no network)

The state (networks, Adam, replay pool, lagged record, RNGs) is saved by rank 0 as `sams.pt` in each
checkpoint, so a resumed run continues the same rounds, and in the stage's final/, from which the loop's
next iteration continues (`load_carried`). No policy forward, loss or backward here.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist

from rayalign.checkpoint import load_tensors
from rayalign.config import Config
from rayalign.core.sams import SamsScheduler, num_selected, sample_rewards, select_top_k

STATE_FILE = "sams.pt"


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def pair_margins(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, *, beta: float) -> torch.Tensor:
    """The DPO logits u = beta * ((pi_w - ref_w) - (pi_l - ref_l)) of each pair, detached (B,)."""
    return (beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))).detach()


class PairSelector:
    """Chooses, each optimizer step, the K = ceil(rho * n) pairs of the global batch that get a backward."""

    def __init__(self, config: Config, *, num_layers: int, hidden_size: int, total_steps: int, rank: int = 0):
        sams = config.sams
        self.kind, self.ratio, self.delta, self.rank = sams.selector, sams.ratio, sams.margin_weight, rank
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.scheduler = None
        if self.kind == "bandit" and rank == 0:
            self.scheduler = SamsScheduler(
                num_layers=num_layers, hidden_size=hidden_size, d=sams.encoder_dim, width=sams.width,
                depth=sams.depth, dropout=sams.dropout, lr=sams.lr, ratio=sams.ratio,
                explore_weight=sams.explore_weight, gamma=sams.batch_reward_weight, delta=sams.margin_weight,
                pool_size=sams.pool_size, pool_batches=sams.pool_batches,
                warmup_steps=math.ceil(sams.warmup_fraction * total_steps),
                updates_per_round=sams.updates_per_round, seed=config.train.seed)
        self.last: dict[str, float] = {}

    def select(self, *, start: int, n: int, losses: torch.Tensor, margins: torch.Tensor,
               chosen_logps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The global 0/1 selection mask (n,) bool; this worker's pairs sit at [start, start + len(losses)).

        Call on every worker with its own (possibly empty) slice: the gathers are collectives.
        """
        count, device = losses.shape[0], losses.device
        flat = torch.zeros(3, n, dtype=torch.float64, device=device)
        full_context = torch.zeros(n, *context.shape[1:], dtype=torch.float32, device=device)
        if count:
            flat[:, start:start + count] = torch.stack([losses, margins, chosen_logps]).detach().double()
            full_context[start:start + count] = context[:count].float()
        flat, full_context = _all_reduce(flat), _all_reduce(full_context)
        mask = torch.zeros(n, dtype=torch.float64, device=device)
        if self.rank == 0:
            mask[self._choose(flat[0].cpu(), flat[1].cpu(), flat[2].cpu(), full_context.cpu()).to(device)] = 1.0
        mask = _all_reduce(mask).bool()
        self.last["sams/selected"] = int(mask.sum())
        return mask

    def _choose(self, losses: torch.Tensor, margins: torch.Tensor, chosen_logps: torch.Tensor,
                context: torch.Tensor) -> torch.Tensor:
        n = losses.shape[0]
        if self.kind == "random":
            return torch.randperm(n, generator=self.generator)[:num_selected(n, ratio=self.ratio)].sort().values
        if self.kind == "top_rs":
            return select_top_k(sample_rewards(margins, chosen_logps, delta=self.delta), ratio=self.ratio)
        chosen = self.scheduler.schedule(context, mean_loss=losses.mean(), margins=margins,
                                         chosen_logps=chosen_logps)
        # round: counted over the whole loop when the state is carried between iterations (`load_carried`)
        self.last.update({"sams/fit_loss": chosen.fit_loss, "sams/warmup": int(chosen.warmup),
                          "sams/round": self.scheduler.round})
        return chosen.indices

    def metrics(self) -> dict[str, float]:
        """This step's counts for the log (the scheduler's fit loss only on rank 0, which writes the log)."""
        return {k: v for k, v in self.last.items() if not (isinstance(v, float) and math.isnan(v))}

    def state_dict(self) -> dict:
        return {"kind": self.kind, "generator": self.generator.get_state(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def save(self, directory: Path) -> None:
        if self.rank == 0:
            torch.save(self.state_dict(), directory / STATE_FILE)

    def load_carried(self, directory: Path) -> None:
        """Continue from the state a previous training stage left in its final/ (`save_final`): the bandit's
        networks, Adam, replay pool, lagged record, round count and RNGs carry on, so it keeps learning over
        the loop's iterations (its warm-up, counted in rounds, is not repeated). A final/ without the file (a
        stage trained before SamS was enabled) starts a fresh selector, saying so."""
        if self.rank == 0 and not (directory / STATE_FILE).is_file():
            print(f"rayalign train: warning: no {STATE_FILE} in {directory}: SamS starts a fresh scheduler",
                  flush=True)
            return
        self.load(directory)

    def load(self, directory: Path) -> None:
        """Continue from a checkpoint written by `save` (rank 0 holds the state; other ranks hold none)."""
        if self.rank != 0:
            return
        state = load_tensors(directory / STATE_FILE)
        if state["kind"] != self.kind:
            raise ValueError(f"{directory / STATE_FILE}: saved by sams.selector={state['kind']}, "
                             f"this run uses {self.kind}")
        self.generator.set_state(state["generator"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
