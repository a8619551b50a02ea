"""Run a Hugging Face causal LM without its output head, so the head can run chunk by chunk (`core.head`).

`forward_scores(model, ...)` calls the model (the DDP / DeepSpeed wrapper included, so their forward hooks
run) with its `lm_head` swapped for the identity for the duration of the call: the model's "logits" are then
its final hidden states, and the returned `HeadScores` applies the real head only where and when asked.
Whether a model's logits are exactly `lm_head(hidden)` is checked once per model object on three tokens;
a model that post-processes them (soft-capping, scaling) falls back to its own full logits, reduced by the
same `HeadScores` methods (`HeadScores.from_logits`), as does `chunk_rows=0`.

Not here: what is computed from the scores (`rayalign.step`, `rayalign.group_step`), device placement.
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from rayalign.core.head import HeadScores

_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # inner model -> head detachable


def unwrap(model):
    """The Hugging Face model inside DDP / a DeepSpeed engine (their `.module`), or the model itself."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def detached_head(inner):
    """Within: `inner`'s output head is the identity; yields the real head (an `nn.Module`)."""
    head = inner.get_output_embeddings()
    inner.set_output_embeddings(torch.nn.Identity())
    try:
        yield head
    finally:
        inner.set_output_embeddings(head)


def _head_is_plain(inner) -> bool:
    """True when `inner`'s logits are its head applied to its final hidden states (checked once per model)."""
    if inner in _HEAD_CHECKED:
        return _HEAD_CHECKED[inner]
    get_head = getattr(inner, "get_output_embeddings", None)  # absent: not a transformers model (a wrapper)
    head = get_head() if get_head is not None else None
    plain = isinstance(head, torch.nn.Module) and hasattr(inner, "set_output_embeddings")
    if plain:
        device = next(inner.parameters()).device
        ids = torch.tensor([[0, 1, 2]], device=device) % max(int(getattr(head, "out_features", 3) or 3), 1)
        was_training = inner.training
        inner.eval()
        with torch.no_grad():
            logits = inner(input_ids=ids, use_cache=False).logits.float()
            with detached_head(inner) as real_head:
                hidden = inner(input_ids=ids, use_cache=False).logits
            recomputed = real_head(hidden).float()
            plain = recomputed.shape == logits.shape and torch.allclose(recomputed, logits, rtol=1e-4, atol=1e-4)
        inner.train(was_training)
    _HEAD_CHECKED[inner] = plain
    return plain


def vocab_size_of(head, inner) -> int:
    """The head's output width (`out_features`: unaffected by ZeRO-3 partitioning), else the config's."""
    width = getattr(head, "out_features", None)
    return int(width) if width else int(inner.config.vocab_size)


def forward_scores(model, *, chunk_rows: int, temperature: float = 1.0, **inputs) -> tuple[HeadScores, object]:
    """Call `model(**inputs, use_cache=False)`; return its aligned `HeadScores` (position t scores token t+1:
    (B, T-1) positions) and the model's outputs (hidden states when asked for with output_hidden_states)."""
    inner = unwrap(model)
    if chunk_rows > 0 and _head_is_plain(inner):
        with detached_head(inner) as head:
            outputs = model(**inputs, use_cache=False)
        scores = HeadScores(outputs.logits[:, :-1], head, vocab_size=vocab_size_of(head, inner),
                            temperature=temperature, chunk_rows=chunk_rows)
        return scores, outputs
    outputs = model(**inputs, use_cache=False)
    return HeadScores.from_logits(outputs.logits[:, :-1], temperature=temperature,
                                  chunk_rows=chunk_rows or max(1, outputs.logits.shape[:2].numel())), outputs


def packed_token_logps(model, input_ids: torch.Tensor, positions: torch.Tensor, completion: torch.Tensor,
                       segment: torch.Tensor, *, chunk_rows: int, temperature: float = 1.0):
    """One forward over sequences packed into one row ((N,) ids, position ids restarting per sequence,
    completion mask, sequence index): each sequence attends to itself only (`rayalign.varlen_attention`, or the
    model's own block-diagonal mask built from the position ids where that cannot be switched in).
    Returns (per-token log-probs (N-1,), their mask (N-1,), the `HeadScores` of the (1, N-1) positions)."""
    from rayalign.varlen_attention import use_varlen_attention

    use_varlen_attention(unwrap(model))
    scores, _ = forward_scores(model, chunk_rows=chunk_rows, temperature=temperature,
                               input_ids=input_ids[None], position_ids=positions[None])
    # A label belongs to its logit's sequence, or it is the next sequence's first token: mask it.
    mask = completion[1:] * (segment[1:] == segment[:-1])
    return scores.token_logps(input_ids[1:][None], mask[None])[0], mask, scores
