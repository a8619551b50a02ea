"""One micro-batch of a preference update: forward, per-example loss, the numbers to log.

Shared by the in-process oracle and the Ray Train workers, so both compute the exact same thing.
Chosen and rejected go through the model in one forward: either right-padded and concatenated along the
batch, or (`padding_free=True`) packed into a single row with position ids restarting per sequence, so no
FLOPs go to padding (the model's attention builds the block-diagonal mask from the position ids).

Reference values come from the batch (the cache) or, when the batch has none, from a reference forward
run here without gradient. What the batch holds is its data kind (`rayalign.data_kind`), passed in: the
K-sample kind goes to `rayalign.group_step`, the GDPO kinds add the level digits (and beliefs).
No optimizer, no distributed code, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from rayalign import group_step
from rayalign.batching import pad_rows
from rayalign.config import Config
from rayalign.core.head import DEFAULT_CHUNK_ROWS, HeadScores, mixed_token_logps
from rayalign.core.logprobs import concatenate_pairs
from rayalign.core.metrics import js_distance
from rayalign.data_kind import BELIEFS, GROUPS, LEVEL_KINDS, PAIRS
from rayalign.devices import model_device
from rayalign.group_batching import GROUP_REF_KEY
from rayalign.lm_head import forward_scores, packed_token_logps
from rayalign.objective import LOSSES, pair_loss, uses_mean_logps
from rayalign.step_types import MicroBatchOutput, RefineSettings  # noqa: F401 (re-exported)

PAIR_KEYS = tuple(f"{side}_{kind}" for side in ("chosen", "rejected")
                  for kind in ("input_ids", "attention_mask", "completion_mask"))
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_mean_logps", "ref_rejected_mean_logps")
ENTROPY_KEYS = ("ref_chosen_entropy", "ref_rejected_entropy", "ref_vocab_size")
GAP_METRIC = "gdpo/js_gap"  # GDPO's alignment gap (`belief_gap_sums`); the eval logs it as eval/gdpo/js_gap


@dataclass
class SequenceScores:
    """Per-sequence values of one forward over B pairs: (B,) each; entropies only when asked."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_mean: torch.Tensor
    rejected_mean: torch.Tensor
    chosen_entropy: torch.Tensor | None = None
    rejected_entropy: torch.Tensor | None = None
    vocab_size: int = 0
    level_logps: torch.Tensor | None = None  # GDPO: (B, L) full-vocabulary log-probs of the level digits
    belief_mean_logps: torch.Tensor | None = None  # GDPO: (B,) mean log-prob of the belief prefix
    forward: object | None = None  # the `ConcatenatedOutput` (aligned logits, labels, mask) when kept
    context: torch.Tensor | None = None  # SamS: (B, L, D) per-pair block-output means, detached


def pack_pairs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pack the real tokens of [chosen; rejected] into one row: (1, N) ids, positions, completion mask.

    `segment` (N,) says which of the 2B sequences each token belongs to.
    """
    ids, positions, completion, segment = [], [], [], []
    for i, side in enumerate(("chosen", "rejected")):
        lengths = batch[f"{side}_attention_mask"].sum(dim=1).tolist()
        for row, length in enumerate(lengths):
            ids.append(batch[f"{side}_input_ids"][row, :length])
            completion.append(batch[f"{side}_completion_mask"][row, :length])
            device = batch[f"{side}_input_ids"].device
            positions.append(torch.arange(length, device=device))
            segment.append(torch.full((length,), i * len(lengths) + row, device=device))
    return {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
            "completion_mask": torch.cat(completion)[None], "segment": torch.cat(segment)}


def _packed_scores(model, batch, *, temperature: float, want_entropy: bool, levels: bool,
                   chunk_rows: int) -> SequenceScores:
    packed = pack_pairs(batch)
    segment = packed["segment"]
    per_token, mask, head = packed_token_logps(model, packed["input_ids"][0], packed["position_ids"][0],
                                               packed["completion_mask"][0], segment, chunk_rows=chunk_rows,
                                               temperature=temperature)
    count, like = 2 * batch["chosen_input_ids"].shape[0], {"dtype": per_token.dtype, "device": per_token.device}
    sums = torch.zeros(count, **like).index_add(0, segment[:-1], per_token)
    lengths = torch.zeros(count, **like).index_add(0, segment[:-1], mask.to(per_token.dtype))
    means = sums / lengths.clamp(min=1)
    scores = SequenceScores(*sums.chunk(2), *means.chunk(2), vocab_size=head.vocab_size)
    if levels:  # the DPO baseline on GDPO rows: chosen row i starts at its packed offset
        chosen_lengths = batch["chosen_attention_mask"].sum(dim=1)
        starts = chosen_lengths.cumsum(0) - chosen_lengths
        scores.level_logps = head.logps_at(torch.zeros_like(starts), starts + batch["level_position"] - 1,
                                           batch["level_ids"])
    if want_entropy:
        entropy = head.token_entropy(mask[None])[0]
        mean_entropy = torch.zeros(count, **like).index_add(0, segment[:-1], entropy.to(per_token.dtype))
        scores.chosen_entropy, scores.rejected_entropy = (mean_entropy / lengths.clamp(min=1)).chunk(2)
    return scores


class PairForward(NamedTuple):
    """What SPA's refinement reads again from the policy's padded forward: its scores, labels and mask."""

    head: HeadScores  # (2B, T-1) aligned positions
    labels: torch.Tensor  # (2B, T-1)
    mask: torch.Tensor  # (2B, T-1) completion mask


def _padded_forward(model, batch: dict, *, temperature: float, chunk_rows: int, want_context: bool = False):
    """The model once over [chosen; rejected] (`concatenate_pairs`): its `PairForward` and outputs."""
    input_ids, attention_mask, completion_mask = concatenate_pairs(*(batch[k] for k in PAIR_KEYS))
    extra = {"output_hidden_states": True} if want_context else {}
    head, outputs = forward_scores(model, chunk_rows=chunk_rows, temperature=temperature, input_ids=input_ids,
                                   attention_mask=attention_mask, **extra)
    return PairForward(head, input_ids[:, 1:], completion_mask[:, 1:]), outputs, attention_mask


def sequence_scores(model, batch: dict, *, kind: str = PAIRS, padding_free: bool = False,
                    temperature: float = 1.0, want_entropy: bool = False, keep_forward: bool = False,
                    want_context: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> SequenceScores:
    """Summed and per-token-mean completion log-probs (and mean entropies) of chosen and rejected.

    For the GDPO kinds (`kind` LEVEL_PAIRS, BELIEFS) also the level digits' log-probs, and for BELIEFS the
    belief prefix's mean log-prob. `want_context` also returns SamS's per-pair context from the hidden
    states of this same forward. The head runs in chunks of `chunk_rows` positions (`rayalign.core.head`).
    """
    levels = kind in LEVEL_KINDS
    if padding_free:
        return _packed_scores(model, batch, temperature=temperature, want_entropy=want_entropy, levels=levels,
                              chunk_rows=chunk_rows)
    forward, outputs, attention_mask = _padded_forward(model, batch, temperature=temperature, chunk_rows=chunk_rows,
                                                       want_context=want_context)
    head, mask = forward.head, forward.mask
    sums = head.token_logps(forward.labels, mask).sum(dim=-1)
    # Means from the sums and token counts: a second log-softmax over the vocabulary would cost a full pass.
    counts = mask.sum(dim=-1).clamp(min=1).to(sums.dtype)
    chosen, rejected = sums.chunk(2)
    chosen_count, rejected_count = counts.chunk(2)
    scores = SequenceScores(chosen, rejected, chosen / chosen_count, rejected / rejected_count,
                            vocab_size=head.vocab_size)
    if want_entropy:
        mean_entropy = head.token_entropy(mask).sum(dim=-1) / counts
        scores.chosen_entropy, scores.rejected_entropy = mean_entropy.chunk(2)
    if levels:  # GDPO rows, or the DPO baseline on them: the level digit's distribution
        # the digit at input position P is predicted by aligned position P - 1; chosen rows come first
        rows = torch.arange(batch["level_ids"].shape[0], device=mask.device)
        scores.level_logps = head.logps_at(rows, batch["level_position"] - 1, batch["level_ids"])
    if kind == BELIEFS:
        scores.belief_mean_logps = belief_mean_logps(forward, batch)
    if want_context:
        from rayalign.core.sams import context_features

        scores.context = context_features(outputs.hidden_states, attention_mask)
    if keep_forward:
        scores.forward = forward
    return scores


def belief_mean_logps(forward: PairForward, batch: dict) -> torch.Tensor:
    """GDPO's (B,) mean log-prob of the chosen rows' belief prefix, from the padded forward over [chosen;
    rejected] (chosen rows first)."""
    size = batch["chosen_input_ids"].shape[0]
    belief_mask = batch["chosen_belief_mask"][:, 1:]
    mask = torch.zeros_like(forward.mask)
    mask[:size, :belief_mask.shape[1]] = belief_mask
    per_token = forward.head.token_logps(forward.labels, mask)[:size]
    return per_token.sum(dim=-1) / belief_mask.sum(dim=-1).clamp(min=1).to(per_token.dtype)


def belief_gap_sums(level_logps: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """(count, sum of alignment gaps) in float64, summable across micro-batches and workers: the JS distance
    between each row's target p* (B, L) and the softmax of its L level-digit log-probs (B, L), i.e. the
    full-vocabulary digit probabilities renormalised over the digits (ALGORITHMS.md §3, measure (a))."""
    with torch.no_grad():
        gaps = js_distance(target_probs.double(), torch.softmax(level_logps.double(), dim=-1))
        return torch.stack([torch.tensor(float(gaps.numel()), dtype=torch.float64, device=gaps.device), gaps.sum()])


@torch.no_grad()
def reference_scores(reference, batch: dict, config: Config, *, want_entropy: bool) -> dict[str, torch.Tensor]:
    """The reference columns of `REF_KEYS` (+ `ENTROPY_KEYS`) for a collated batch, without gradient;
    for a K-sample loss (whose batches are groups), `ref_logps` (B, K)."""
    if LOSSES[config.loss.type].is_group:
        return {GROUP_REF_KEY: group_step.reference_group_logps(reference, batch, config)}
    scores = sequence_scores(reference, batch, padding_free=config.packs_rows,
                             temperature=config.loss.logit_temperature, want_entropy=want_entropy,
                             chunk_rows=config.model.head_chunk_tokens)
    out = {"ref_chosen_logps": scores.chosen, "ref_rejected_logps": scores.rejected,
           "ref_chosen_mean_logps": scores.chosen_mean, "ref_rejected_mean_logps": scores.rejected_mean}
    if want_entropy:
        # V of MallowsPO's normaliser is the logits' width (ALGORITHMS.md §2), kept per row for the cache.
        out.update(ref_chosen_entropy=scores.chosen_entropy, ref_rejected_entropy=scores.rejected_entropy,
                   ref_vocab_size=torch.full_like(scores.chosen, float(scores.vocab_size)))
    return {k: v.detach() for k, v in out.items()}


@torch.no_grad()
def refine_smoothing(policy_forward: PairForward, reference, batch: dict, ref_chosen: torch.Tensor,
                     ref_rejected: torch.Tensor, config: Config,
                     refine: RefineSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """SPA's per-pair confidence margins m (B,) and label smoothing eps = alpha * [m <= tau] (B,).

    Needs the reference's per-token logits (chunk by chunk, beside the policy's), so the reference runs here
    even when its sequence log-probs are cached.
    """
    from rayalign.core.spa import refine_label_smoothing, refine_margins

    ref_forward = _padded_forward(reference, batch, temperature=config.loss.logit_temperature,
                                  chunk_rows=config.model.head_chunk_tokens)[0]
    mixed = mixed_token_logps(policy_forward.head, ref_forward.head, policy_forward.labels, policy_forward.mask,
                              mix=refine.mix).sum(dim=-1)
    margins = refine_margins(*mixed.chunk(2), ref_chosen, ref_rejected, beta=config.loss.beta)
    smoothing = refine_label_smoothing(margins, refine.threshold, alpha=refine.alpha, active=refine.active)
    return margins, smoothing


def micro_batch_loss(
    policy, batch: dict, config: Config, *, reference=None, neg_log_dispersion: torch.Tensor | None = None,
    weights: torch.Tensor | None = None, label_smoothing: torch.Tensor | None = None,
    refine: RefineSettings | None = None, want_context: bool = False, kind: str | None = None,
) -> MicroBatchOutput:
    """Forward the policy on one micro-batch and return its per-example losses (B,), weighted if asked.

    `kind` is the batch's data kind (`rayalign.data_kind`, decided once per run); None: the one the loss
    trains on (LEVEL_PAIRS, the DPO baseline on GDPO rows, must be said). Reference log-probs are read
    from the batch (`REF_KEYS`, the cache) or computed with `reference`.
    `weights` (B,) multiplies each pair's loss (schedulers); `label_smoothing` (B,) gives DPO soft labels;
    `refine` computes them with SPA's self-refinement instead (it needs `reference`); `want_context`
    returns SamS's per-pair context from the same forward.
    """
    kind = kind or LOSSES[config.loss.type].data
    if kind == GROUPS:  # K-sample groups (exo_rw, dpo_rw) take their own step
        return group_step.group_micro_batch_loss(policy, batch, config, reference=reference, weights=weights)
    ref = {k: batch[k] for k in REF_KEYS} if REF_KEYS[0] in batch else None
    if ref is None:
        if reference is None:
            raise ValueError("the batch has no cached reference log-probs and no reference model was given")
        ref = reference_scores(reference, batch, config, want_entropy=False)
    # SPA's refinement and SamS's context read the padded forward (Config.padded_only says so for a config)
    packed = config.packs_rows and refine is None and not want_context
    scores = sequence_scores(policy, batch, kind=kind, padding_free=packed,
                             temperature=config.loss.logit_temperature, keep_forward=refine is not None,
                             want_context=want_context, chunk_rows=config.model.head_chunk_tokens)
    margins = None
    if refine is not None:
        margins, label_smoothing = refine_smoothing(scores.forward, reference, batch, ref["ref_chosen_logps"],
                                                    ref["ref_rejected_logps"], config, refine)
    if uses_mean_logps(config.loss.type):
        args = (scores.chosen_mean, scores.rejected_mean, ref["ref_chosen_mean_logps"], ref["ref_rejected_mean_logps"])
    else:
        args = (scores.chosen, scores.rejected, ref["ref_chosen_logps"], ref["ref_rejected_logps"])
    gdpo = {"level_logps": scores.level_logps, "belief_mean_logps": scores.belief_mean_logps,
            "target_probs": batch["target_probs"]} if kind == BELIEFS else None
    output = pair_loss(config.loss, *args, neg_log_dispersion=neg_log_dispersion, label_smoothing=label_smoothing,
                       gdpo=gdpo)
    losses = output.losses if weights is None else output.losses * weights
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    relabelled = int((label_smoothing > 0).sum()) if margins is not None else 0
    return MicroBatchOutput(losses, scores.chosen.detach(), scores.rejected.detach(),
                            ref["ref_chosen_logps"], ref["ref_rejected_logps"], tokens, margins, relabelled,
                            scores.context, None if scores.level_logps is None else scores.level_logps.detach())


@torch.no_grad()
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                     pad_token_id: int, batch_size: int = 32, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     temperature: float = 1.0) -> torch.Tensor:
    """Summed log-prob of each completion given its prompt, (N,) float32+, batched and right-padded; the head
    in chunks of `chunk_rows` completion positions, the logits divided by `temperature`."""
    out, device = [], model_device(model)
    for start in range(0, len(prompt_ids), batch_size):
        rows = list(zip(prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]))
        length = max(len(p) + len(c) for p, c in rows)
        ids = pad_rows([p + c for p, c in rows], length, pad_token_id).to(device)
        attention = pad_rows([[1] * (len(p) + len(c)) for p, c in rows], length, 0).to(device)
        completion = pad_rows([[0] * len(p) + [1] * len(c) for p, c in rows], length, 0).to(device)
        head, _ = forward_scores(model, chunk_rows=chunk_rows, temperature=temperature, input_ids=ids,
                                 attention_mask=attention)
        out.append(head.token_logps(ids[:, 1:], completion[:, 1:]).sum(dim=-1).cpu())
    return torch.cat(out)
