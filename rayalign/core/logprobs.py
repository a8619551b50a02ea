"""Token and sequence log-probs, entropies and the chosen+rejected forward pass (spec §0, §2).

Token-level helpers take **aligned** tensors: `logits[:, t]` scores `labels[:, t]`, and a 0/1 `mask`
of shape (B, T) marks completion tokens (prompt and padding are 0). `shift_for_causal_lm` does the
one-position shift from a causal LM's outputs; `concatenated_forward` runs the model once on chosen
and rejected and returns their sequence log-probs. Log-softmax is taken in float32 at least.

Not here: tokenisation, building the completion masks, reference caching, losses, anything that
imports transformers (the model is any callable returning an object with `.logits`).
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # bf16/fp16 log-softmax over a large vocabulary loses the small probabilities; keep float64 for checks.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs log p(labels[:, t] | logits[:, t]), (B, T, V), (B, T), (B, T) -> (B, T).

    Zero where `mask` is 0. Labels at masked positions may be anything (−100, pad ids): they are
    replaced by 0 before indexing. Computed in float32 (float64 if the logits are float64).
    """
    keep = mask.bool()
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels))
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    per_token = logp.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    # where, not a product: a −inf log-prob at a masked position must not become 0·(−inf) = NaN.
    return torch.where(keep, per_token, torch.zeros_like(per_token))


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, average: bool = False
) -> torch.Tensor:
    """Sum over completion tokens of the token log-probs, (B, T, V), (B, T), (B, T) -> (B,).

    `average=True` gives the per-token mean instead (IPO, length-normalised losses); a row with no
    completion token gives 0.
    """
    per_token = token_logps(logits, labels, mask)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    return total / mask.sum(dim=-1).clamp(min=1).to(total.dtype)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy H = −Σ_v p_v log p_v of every position, in nats: (..., V) -> (...).

    Computed in float32 (float64 kept). The one place that computes it (padded and packed paths alike).
    """
    logp = torch.log_softmax(logits.to(_compute_dtype(logits)), dim=-1)
    p = logp.exp()
    # p = 0 with log p = −inf (a masked vocabulary entry) contributes 0, not NaN.
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(dim=-1)


def sequence_mean_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over completion tokens of the full-vocabulary entropy H_t = −Σ_v p_v log p_v, in nats.

    (B, T, V), (B, T) -> (B,). Computed in float32 (float64 kept): bf16 entropies can underflow to 0,
    which would make MallowsPO's k = −c·ln H̄ infinite. A row with no completion token gives 0.
    Meant for the reference model under `torch.no_grad()`; it materialises (B, T, V) float32 tensors.
    """
    entropy = token_entropy(logits)
    keep = mask.bool()
    total = torch.where(keep, entropy, torch.zeros_like(entropy)).sum(dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1).to(total.dtype)


def shift_for_causal_lm(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets: position t's logits predict token t+1.

    (B, T, V), (B, T), (B, T) -> logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:] with
    T−1 positions each, ready for `token_logps` / `sequence_logps` / `sequence_mean_entropy`.
    """
    return logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:]


def _pad_right(x: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=0)


def concatenate_pairs(
    chosen_input_ids: torch.Tensor, chosen_attention_mask: torch.Tensor, chosen_completion_mask: torch.Tensor,
    rejected_input_ids: torch.Tensor, rejected_attention_mask: torch.Tensor, rejected_completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[chosen; rejected] stacked along the batch, both right-padded (id 0, masks 0) to the longer width:
    (2B, T) input ids, attention mask and completion mask."""
    if chosen_input_ids.shape[0] != rejected_input_ids.shape[0]:
        raise ValueError(
            "chosen and rejected batch sizes differ: "
            f"{chosen_input_ids.shape[0]} vs {rejected_input_ids.shape[0]}"
        )
    length = max(chosen_input_ids.shape[1], rejected_input_ids.shape[1])
    return tuple(torch.cat([_pad_right(chosen, length), _pad_right(rejected, length)]) for chosen, rejected in (
        (chosen_input_ids, rejected_input_ids), (chosen_attention_mask, rejected_attention_mask),
        (chosen_completion_mask, rejected_completion_mask)))


class ConcatenatedOutput(NamedTuple):
    chosen_logps: torch.Tensor  # (B,)
    rejected_logps: torch.Tensor  # (B,)
    logits: torch.Tensor | None  # (2B, T−1, V) aligned, divided by the temperature; None unless asked
    labels: torch.Tensor  # (2B, T−1) aligned targets (chosen rows first)
    mask: torch.Tensor  # (2B, T−1) aligned completion mask
    attention_mask: torch.Tensor  # (2B, T) padded attention mask given to the model
    hidden_states: tuple | None  # the model's hidden states if `output_hidden_states`, else None


def concatenated_forward(
    model: Callable,
    chosen_input_ids: torch.Tensor,
    chosen_attention_mask: torch.Tensor,
    chosen_completion_mask: torch.Tensor,
    rejected_input_ids: torch.Tensor,
    rejected_attention_mask: torch.Tensor,
    rejected_completion_mask: torch.Tensor,
    *,
    average: bool = False,
    logit_temperature: float = 1.0,
    return_logits: bool = False,
    output_hidden_states: bool = False,
) -> ConcatenatedOutput:
    """One forward pass over chosen and rejected, stacked along the batch: (B, T_c) and (B, T_r) inputs.

    Both are right-padded to T = max(T_c, T_r) with token id 0 and masks 0, concatenated as
    [chosen; rejected] (2B, T), and the model is called once as
    `model(input_ids=..., attention_mask=..., use_cache=False[, output_hidden_states=True])`;
    any HF causal LM works. Its logits are divided by `logit_temperature` (EXO's τ, default 1),
    shifted by one position, and reduced to sequence log-probs over the completion tokens: sums, or
    per-token means with `average=True`. Returns `ConcatenatedOutput`; the aligned logits only if
    `return_logits` (they are the largest tensor of the step), hidden states only if asked.
    Inputs should be right-padded: padding inside a row shifts the positions HF assigns by default.
    """
    if not logit_temperature > 0:
        raise ValueError(f"logit_temperature must be > 0, got {logit_temperature}")
    input_ids, attention_mask, completion_mask = concatenate_pairs(
        chosen_input_ids, chosen_attention_mask, chosen_completion_mask,
        rejected_input_ids, rejected_attention_mask, rejected_completion_mask)
    extra = {"output_hidden_states": True} if output_hidden_states else {}
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    logits = outputs.logits
    if logit_temperature != 1.0:
        logits = logits / logit_temperature
    logits, labels, mask = shift_for_causal_lm(logits, input_ids, completion_mask)
    logps = sequence_logps(logits, labels, mask, average=average)
    chosen_logps, rejected_logps = logps.chunk(2)
    return ConcatenatedOutput(
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        logits=logits if return_logits else None,
        labels=labels,
        mask=mask,
        attention_mask=attention_mask,
        hidden_states=outputs.hidden_states if output_hidden_states else None,
    )
