"""Per-sequence causal attention for packed rows (`train.padding_free`), on any device, without a dense mask.

A packed row holds many sequences back to back, its position ids restarting at each one. Given such a row,
transformers' `sdpa` attention builds a dense (N, N) block-diagonal mask and attends over all N² query-key
pairs, most of them masked: at 32 sequences of ~300 tokens that is ~30x the work of attending within each
sequence, which is why packing used to be slower than padding. Flash-attention's varlen kernels avoid it, but
only on CUDA. `use_varlen_attention(model)` switches an `sdpa` model to `varlen_attention` for good: a row
without a 2D attention mask is cut at its position-id restarts (transformers' own packed-sequence rule) and
each sequence goes through `scaled_dot_product_attention(is_causal=True)` on its own; every other call
(a padding mask, one sequence per row, a KV-cache step) is exactly transformers' `sdpa` path. The switch is
permanent rather than scoped to one call because gradient checkpointing re-runs the forward in backward.

Only for models that route attention through transformers' attention interface (`_supports_attention_backend`)
and run `sdpa`; flash-attention models already run varlen, and `eager` stays what the user asked for.
Not here: packing itself (`rayalign.step.pack_pairs`, `rayalign.lm_head.packed_token_logps`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "rayalign_varlen"
_registered = False


def segment_bounds(position_ids: torch.Tensor) -> list[int]:
    """[0, start_2, ..., N] of the sequences in one packed row (N,): a sequence starts where the position id
    does not continue the previous one by +1 (transformers' `find_packed_sequence_indices` rule)."""
    starts = torch.nonzero(position_ids[1:] != position_ids[:-1] + 1).flatten() + 1
    return [0, *starts.tolist(), position_ids.numel()]


def _per_sequence(query, key, value, bounds: list[int], dropout: float, scaling) -> torch.Tensor:
    """(1, H, N, D) of one row -> (1, H, N, D), each [start, end) attending causally to itself. The inputs stay
    4-D (on CPU, 3-D ones fall back to SDPA's unfused math path) and are cut with `split`, whose backward is one
    `cat`: a slice per sequence would zero-fill and add a full-size gradient for each (both measured here)."""
    sizes = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat([F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
                      for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2),
                                         value.split(sizes, dim=2))], dim=2)


def varlen_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: (B, H, T, D) -> (B, T, H, D). Packed rows (no mask, position
    ids restarting, queries = keys) attend per sequence; anything else is transformers' `sdpa_attention_forward`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2]
            or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = [segment_bounds(row) for row in position_ids.expand(query.shape[0], -1)]
    if all(len(b) == 2 for b in bounds):  # nothing packed: one causal attention over the batch
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if key.shape[1] != query.shape[1]:  # grouped-query attention: expand the key/value heads
        repeats = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    rows = [_per_sequence(q, k, v, b, dropout, scaling)
            for q, k, v, b in zip(query.split(1), key.split(1), value.split(1), bounds)]
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    """The mask function under NAME: none where the attention works it out from the position ids (no 2D
    mask given), else `sdpa`'s."""
    from transformers.masking_utils import sdpa_mask

    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        AttentionInterface.register(NAME, varlen_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _varlen_mask)
        _registered = True


def use_varlen_attention(inner) -> bool:
    """Switch `inner` (a transformers model) from `sdpa` to `varlen_attention`; True when it runs it now."""
    config = getattr(inner, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return True
    if current != "sdpa" or not getattr(inner, "_supports_attention_backend", False):
        return False
    _register()
    config._attn_implementation = NAME
    return True
