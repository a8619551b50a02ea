"""Preference pairs -> token ids -> right-padded training tensors.

Prompt and completion are tokenized separately and concatenated (as TRL does), so the completion mask
is exact and never depends on how a BPE merges across the boundary. EOS is appended to every
completion. Truncation keeps the *end* of a long prompt and the *start* of a long completion, and says
so in the returned flags: nothing is truncated or dropped silently.

It does not read files (see `rayalign.data`) and knows nothing of Ray or of the losses.
"""

from __future__ import annotations

from typing import Any

import torch


def encode_pair(
    tokenizer: Any, prompt: str, chosen: str, rejected: str, *, max_prompt_length: int, max_completion_length: int
) -> dict:
    """Token ids of one pair: {prompt_ids, chosen_ids, rejected_ids, prompt_truncated, completion_truncated}."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completions = {}
    completion_truncated = False
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        completion_truncated |= len(ids) > max_completion_length
        completions[f"{name}_ids"] = ids[:max_completion_length]
    return {
        "prompt_ids": prompt_ids[-max_prompt_length:],
        **completions,
        "prompt_truncated": len(prompt_ids) > max_prompt_length,
        "completion_truncated": completion_truncated,
    }


def _pad_rows(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate_pairs(encoded: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of `encode_pair` outputs to one length shared by chosen and rejected.

    Returns (B, T) tensors `{chosen,rejected}_{input_ids,attention_mask,completion_mask}`, where the
    completion mask marks the completion tokens (EOS included) in input-id positions. One shared T lets
    the caller concatenate chosen and rejected into a single forward pass.
    """
    batch: dict[str, torch.Tensor] = {}
    length = max(len(e["prompt_ids"]) + len(e[f"{side}_ids"]) for e in encoded for side in ("chosen", "rejected"))
    for side in ("chosen", "rejected"):
        ids = [e["prompt_ids"] + e[f"{side}_ids"] for e in encoded]
        completion = [[0] * len(e["prompt_ids"]) + [1] * len(e[f"{side}_ids"]) for e in encoded]
        batch[f"{side}_input_ids"] = _pad_rows(ids, length, pad_token_id)
        batch[f"{side}_attention_mask"] = _pad_rows([[1] * len(row) for row in ids], length, 0)
        batch[f"{side}_completion_mask"] = _pad_rows(completion, length, 0)
    return batch
