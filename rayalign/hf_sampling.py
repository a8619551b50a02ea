"""Batched ancestral sampling with an HF causal LM: many prompts in one forward per step, one RNG per row.

`sample_rows` runs the decoding loop HF `generate` runs (left-padded prompts, position ids from the
attention mask, a KV cache, temperature then top-p as `TopPLogitsWarper` defines it), but draws every row's
token from that row's own `torch.Generator` (Gumbel-max: the argmax of the filtered logits plus Gumbel
noise is a draw from their softmax). So a row's sample depends on its seed, not on which prompts share its
batch; HF `generate` draws all rows from one global RNG. With the same batching the samples are
reproducible bit for bit; in another batching the padding can move the logits in their last bits, which
changes a draw only when two candidates tie to that precision. Only the last position's logits are computed
(`logits_to_keep=1`), never the whole sequence's.

No tokenizer, no Ray: token ids in, token ids and their log-probs out.
"""

from __future__ import annotations

import torch


def _draw(logits: torch.Tensor, generators: list[torch.Generator], *, temperature: float,
          top_p: float) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to its top-p nucleus."""
    scaled = logits / temperature
    if top_p < 1.0:  # as transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p
        ordered, order = scaled.sort(dim=-1)
        tail = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        tail[:, -1] = False  # keep at least the most likely token
        scaled = scaled.scatter(-1, order, ordered.masked_fill(tail, float("-inf")))
    noise = torch.stack([torch.rand(scaled.shape[-1], generator=g, dtype=torch.float64) for g in generators])
    gumbel = -torch.log(-torch.log(noise.clamp(min=1e-300)))
    return (scaled.double() + gumbel.to(scaled.device)).argmax(dim=-1)


@torch.no_grad()
def sample_rows(model, prompts: list[list[int]], seeds: list[int], *, temperature: float, top_p: float,
                max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> tuple[list[list[int]], torch.Tensor]:
    """Sample a completion for every prompt row (row r from `seeds[r]`).

    Returns each row's generated ids (up to `max_new_tokens`, padded with `pad_token_id` after its eos; the
    caller cuts at the eos) and the model's log-prob of each generated token, (rows, steps) float32: the
    log-softmax of the raw logits, before temperature and top-p."""
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    position = positions[:, -1:] + 1
    tokens, logps = [], []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        token = _draw(logits, generators, temperature=temperature, top_p=top_p)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        tokens.append(token)
        logps.append(torch.log_softmax(logits, dim=-1).gather(-1, token[:, None])[:, 0])
        done |= token == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        position = position + 1
    return torch.stack(tokens, dim=1).tolist(), torch.stack(logps, dim=1)
