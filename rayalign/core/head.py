"""The output head applied chunk by chunk: token log-probs and entropies without a (tokens, vocabulary) tensor.

A causal LM's head maps (N, D) final hidden states to (N, V) logits; at Qwen's V = 151,936 one step's
logits are gigabytes, and every log-softmax over them makes another copy. `HeadScores` holds the hidden
states and the head instead, and each question (the label's log-prob, the entropy, the log-probs of a few
listed tokens, SPA's mixed log-probs) runs the head on at most `chunk_rows` positions at a time, and only on
the positions asked about (completion tokens, not prompt or padding). Under autograd each chunk is
recomputed in backward (activation checkpointing), so the graph keeps (chunk, D) inputs, never (N, V)
outputs. The numbers equal the unchunked `logprobs.py` functions, gradients included (tests: to 1e-5).

A model whose logits are more than `head(hidden)` (soft-capping, scaling) is used through
`HeadScores.from_logits`: its full logits with the identity as the head, still reduced chunk by chunk.
Not here: running the model or detaching its head (`rayalign.lm_head`), losses, anything beyond torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from rayalign.core.logprobs import token_entropy

DEFAULT_CHUNK_ROWS = 1024  # at V = 151,936 in float32: ~0.6 GB of logits (plus its softmax) per chunk


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class HeadScores:
    """Aligned outputs of one forward, (B, T, D) hidden states (position t predicts labels[:, t]) and the head.

    `temperature` divides the logits (EXO's tau). Every method selects positions with a 0/1 mask first, so
    the head runs only there, and returns zeros at the other positions.
    """

    def __init__(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], *, vocab_size: int,
                 temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.hidden, self.head, self.temperature, self.chunk_rows = hidden, head, temperature, chunk_rows
        self.vocab_size = int(vocab_size)  # the logits' width: MallowsPO's V (ALGORITHMS.md §2)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, *, temperature: float = 1.0,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS) -> HeadScores:
        """Already materialised (B, T, V) logits: the identity is the head."""
        return cls(logits, _identity, temperature=temperature, chunk_rows=chunk_rows, vocab_size=logits.shape[-1])

    def logits_of(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """(n, D) -> (n, V) logits / temperature in float32 at least (float64 kept)."""
        logits = self.head(hidden_rows)
        logits = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        return logits / self.temperature if self.temperature != 1.0 else logits

    def _select(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = mask.bool()
        return keep, self.hidden[keep]

    def token_logps(self, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) log p(labels[:, t]) at mask 1, 0 elsewhere; differentiable (`logprobs.token_logps`)."""
        keep, rows = self._select(mask)
        picked = chunked_rows(lambda h, y: torch.log_softmax(self.logits_of(h), -1).gather(-1, y[:, None])[:, 0],
                              rows, labels[keep], chunk_rows=self.chunk_rows)
        return _scatter(picked, keep)

    @torch.no_grad()
    def token_entropy(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) full-vocabulary entropy at mask 1 in nats, 0 elsewhere, without gradient."""
        keep, rows = self._select(mask)
        entropy = chunked_rows(lambda h: token_entropy(self.logits_of(h)), rows, chunk_rows=self.chunk_rows)
        return _scatter(entropy, keep)

    def logps_at(self, rows: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(n, L) full-vocabulary log-probs of the L `token_ids` (n, L) at (rows[i], positions[i])."""
        hidden = self.hidden[rows, positions]
        return chunked_rows(lambda h, ids: torch.log_softmax(self.logits_of(h), -1).gather(-1, ids), hidden,
                            token_ids, chunk_rows=self.chunk_rows)


def mixed_token_logps(policy: HeadScores, reference: HeadScores, labels: torch.Tensor, mask: torch.Tensor, *,
                      mix: float) -> torch.Tensor:
    """(B, T) token log-probs under the logits mix * policy + (1 - mix) * reference (SPA's de-coupled model,
    `core.spa.mixed_logps`), mixed in float32 before the softmax, chunk by chunk; no gradient is kept."""
    keep = mask.bool()
    ours, theirs = policy.hidden[keep].detach(), reference.hidden[keep]

    def mixed(h_policy, h_reference, y):
        logits = mix * policy.logits_of(h_policy) + (1.0 - mix) * reference.logits_of(h_reference)
        return torch.log_softmax(logits, -1).gather(-1, y[:, None])[:, 0]

    with torch.no_grad():
        return _scatter(chunked_rows(mixed, ours, theirs, labels[keep], chunk_rows=policy.chunk_rows), keep)


def chunked_rows(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """fn over row chunks of `tensors` (all with the same first dimension), concatenated. When gradients are
    needed, each chunk is checkpointed: its (chunk, V) intermediates are recomputed in backward, not kept."""
    total = tensors[0].shape[0]
    if total == 0:
        # one empty call for the output's shape and dtype, and a graph edge to the inputs
        return fn(*tensors)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    parts = []
    for start in range(0, total, chunk_rows):
        chunk = [t[start:start + chunk_rows] for t in tensors]
        parts.append(checkpoint(fn, *chunk, use_reentrant=False) if grad else fn(*chunk))
    return torch.cat(parts)


def _scatter(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(n,) values at the True positions of `keep` (B, T), zeros elsewhere: (B, T)."""
    out = torch.zeros(keep.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(keep, values)
