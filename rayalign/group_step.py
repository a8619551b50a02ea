"""One micro-batch of EXO-rw / DPO-rw on K-sample groups: one forward over B*K sequences, the loss, metrics.

The group counterpart of `rayalign.step.micro_batch_loss`, which hands batches of the GROUPS data kind
(`collate_groups`) here, so the in-process oracle and the Ray Train workers run this same code. The policy's summed
completion log-probs (B, K) come from one forward over all B*K rows (right-padded, or packed into one
row with `train.padding_free`), with the logits divided by `loss.logit_temperature`; the reference's come
from the batch (`ref_logps`, cached by `rayalign.prepare`) or from a no-grad forward here.

The returned `MicroBatchOutput` calls the highest-reward sample of each group "chosen" and the lowest
"rejected" (first index on ties), so the TRL-named metrics keep a meaning: rewards/accuracies is whether
the policy's implicit reward beta * log(pi / pi_ref) orders the best and the worst sample as the rewards
do. No optimizer, no distributed code, no I/O.
"""

from __future__ import annotations

import torch

from rayalign.config import Config
from rayalign.core.head import DEFAULT_CHUNK_ROWS
from rayalign.group_batching import GROUP_REF_KEY
from rayalign.lm_head import forward_scores, packed_token_logps
from rayalign.objective import group_loss
from rayalign.step_types import MicroBatchOutput


def _packed_logps(model, batch: dict, *, temperature: float, chunk_rows: int) -> torch.Tensor:
    """(N,) summed completion log-probs of the N rows, their real tokens packed into one row
    (`rayalign.lm_head.packed_token_logps`, as `rayalign.step.pack_pairs` does for pairs)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    device = batch["input_ids"].device
    ids = torch.cat([batch["input_ids"][i, :n] for i, n in enumerate(lengths)])
    completion = torch.cat([batch["completion_mask"][i, :n] for i, n in enumerate(lengths)])
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    segment = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])
    per_token, _, _ = packed_token_logps(model, ids, positions, completion, segment, chunk_rows=chunk_rows,
                                         temperature=temperature)
    return torch.zeros(len(lengths), dtype=per_token.dtype, device=device).index_add(0, segment[:-1], per_token)


def group_logps(model, batch: dict, *, temperature: float = 1.0, padding_free: bool = False,
                chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Summed completion log-probs (B, K) of a `collate_groups` batch, from one forward over its B*K rows."""
    shape = batch["rewards"].shape
    if padding_free:
        return _packed_logps(model, batch, temperature=temperature, chunk_rows=chunk_rows).view(shape)
    head, _ = forward_scores(model, chunk_rows=chunk_rows, temperature=temperature, input_ids=batch["input_ids"],
                             attention_mask=batch["attention_mask"])
    per_token = head.token_logps(batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:])
    return per_token.sum(dim=-1).view(shape)


@torch.no_grad()
def reference_group_logps(reference, batch: dict, config: Config) -> torch.Tensor:
    """The reference's (B, K) log-probs of a group batch, without gradient (what `ref_logps` caches)."""
    return group_logps(reference, batch, temperature=config.loss.logit_temperature,
                       padding_free=config.packs_rows, chunk_rows=config.model.head_chunk_tokens).detach()


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.detach().gather(1, index[:, None])[:, 0]


def group_micro_batch_loss(policy, batch: dict, config: Config, *, reference=None,
                           weights: torch.Tensor | None = None) -> MicroBatchOutput:
    """Per-group losses (B,) of `loss.type` (exo_rw or dpo_rw) with gradient, and the metric values.

    `weights` (B,) multiplies each group's loss. Reference log-probs come from `batch["ref_logps"]` or,
    without a cache, from `reference`.
    """
    policy_logps = group_logps(policy, batch, temperature=config.loss.logit_temperature,
                               padding_free=config.packs_rows, chunk_rows=config.model.head_chunk_tokens)
    ref = batch.get(GROUP_REF_KEY)
    if ref is None:
        if reference is None:
            raise ValueError("the batch has no cached reference log-probs and no reference model was given")
        ref = reference_group_logps(reference, batch, config)
    # The cache holds float64 copies of float32 values: compute in the policy's dtype either way, so the
    # workers (cache from Parquet) and the oracle (cache in memory) do the same arithmetic.
    ref, rewards = ref.to(policy_logps.dtype), batch["rewards"].to(policy_logps.dtype)
    output = group_loss(config.loss, policy_logps, ref, rewards)
    losses = output.losses if weights is None else output.losses * weights
    best, worst = rewards.argmax(dim=-1), rewards.argmin(dim=-1)
    return MicroBatchOutput(losses, _at(policy_logps, best), _at(policy_logps, worst), _at(ref, best),
                            _at(ref, worst), tokens=int(batch["attention_mask"].sum()))
