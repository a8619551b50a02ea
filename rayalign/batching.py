"""Preference pairs -> token ids -> right-padded training tensors.

Prompt and completion are tokenized separately and concatenated, so the completion mask is exact and
never depends on how a BPE merges across the boundary; both go through `rayalign.templating`, the one
tokenization of every stage (a completion ends at the tokenizer's eos: appended to raw text, or the
end-of-turn token a chat template put there). Truncation keeps the *end* of a long prompt and the *start*
of a long completion, and says so in the returned flags: nothing is truncated or dropped silently.

It does not read files (see `rayalign.data`) and knows nothing of Ray or of the losses; it does not choose
between data kinds either (`rayalign.encode` dispatches on the kind decided once per run).
"""

from __future__ import annotations

from typing import Any

import torch

from rayalign import templating
from rayalign.data_kind import LEVEL_TARGET
from rayalign.templating import Completion, Prompt, completion_ids, render_prompt


def encode_pair(
    tokenizer: Any, prompt: Prompt, chosen: Completion, rejected: Completion, *, max_prompt_length: int,
    max_completion_length: int
) -> dict:
    """Token ids of one pair: {prompt_ids, chosen_ids, rejected_ids, prompt_truncated, completion_truncated}.

    `prompt` is a string or messages (then chosen/rejected are assistant contents or message lists)."""
    text = render_prompt(tokenizer, prompt)
    prompt_ids, prompt_truncated = templating.prompt_ids(tokenizer, prompt, max_prompt_length, prompt_text=text)
    completions = {}
    completion_truncated = False
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        ids, truncated = completion_ids(tokenizer, prompt, completion, max_completion_length, prompt_text=text)
        completion_truncated |= truncated
        completions[f"{name}_ids"] = ids
    return {
        "prompt_ids": prompt_ids,
        **completions,
        "prompt_truncated": prompt_truncated,
        "completion_truncated": completion_truncated,
    }


def pad_rows(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    """Right-pad integer rows to `length` with `value`: a (len(rows), length) long tensor."""
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


def collate_pairs(encoded: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of `encode_pair` outputs to one length shared by chosen and rejected.

    Returns (B, T) tensors `{chosen,rejected}_{input_ids,attention_mask,completion_mask}`, where the
    completion mask marks the completion tokens (EOS included) in input-id positions. One shared T lets
    the caller concatenate chosen and rejected into a single forward pass. GDPO's extra tensors are added
    by `collate_gdpo`.
    """
    batch: dict[str, torch.Tensor] = {}
    length = max(len(e["prompt_ids"]) + len(e[f"{side}_ids"]) for e in encoded for side in ("chosen", "rejected"))
    for side in ("chosen", "rejected"):
        ids = [e["prompt_ids"] + e[f"{side}_ids"] for e in encoded]
        completion = [[0] * len(e["prompt_ids"]) + [1] * len(e[f"{side}_ids"]) for e in encoded]
        batch[f"{side}_input_ids"] = pad_rows(ids, length, pad_token_id)
        batch[f"{side}_attention_mask"] = pad_rows([[1] * len(row) for row in ids], length, 0)
        batch[f"{side}_completion_mask"] = pad_rows(completion, length, 0)
    return batch


def belief_prefix(level: int, text: str) -> str:
    """GDPO's stated belief before its closing '>': "{level}<{belief_text}" (ALGORITHMS.md §3)."""
    return f"{level}<{text}"


def gdpo_rows_as_pairs(rows: list[dict]) -> list[dict]:
    """The DPO baseline on GDPO data: whole completions, the rejected one stating the other belief.

    Each pair keeps its row's target as `level_target`, so the baseline's eval reports the same alignment
    gap as GDPO's (`encode_levels`); the DPO loss never reads it.
    """
    return [{"prompt": r["prompt"],
             "chosen": belief_prefix(r["belief"], r["belief_text"]) + ">" + r["chosen"],
             "rejected": belief_prefix(r["rejected_belief"], r["rejected_belief_text"]) + ">" + r["rejected"],
             LEVEL_TARGET: r["target"]}
            for r in rows]


def _single_token(tokenizer: Any, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"GDPO needs {what} {text!r} to be one token of its own; this tokenizer gives {ids}")
    return ids[0]


def encode_gdpo(tokenizer: Any, row: dict, *, max_prompt_length: int, max_completion_length: int) -> dict:
    """A GDPO row -> ids: prompt, belief prefix, then '>' + answer + EOS for chosen and rejected.

    Both completions share the stated belief; the belief prefix is encoded on its own, so its tokens end
    exactly before the closing '>' (found by characters, not by searching tokens). Checks that the prefix
    starts with the level digit's token and that '>' is a token of its own. The prefix is never truncated.
    """
    levels = len(row["target"])
    level_ids = [_single_token(tokenizer, str(level), "the level digit") for level in range(levels)]
    close_id = _single_token(tokenizer, ">", "the closing")
    prefix = tokenizer(belief_prefix(row["belief"], row["belief_text"]), add_special_tokens=False)["input_ids"]
    if prefix[0] != level_ids[row["belief"]]:
        raise ValueError(f"the belief prefix {belief_prefix(row['belief'], row['belief_text'])!r} does not start "
                         f"with the level digit's token {level_ids[row['belief']]} (got {prefix[0]})")
    pair = encode_pair(tokenizer, row["prompt"], ">" + row["chosen"], ">" + row["rejected"],
                       max_prompt_length=max_prompt_length,
                       max_completion_length=max(1, max_completion_length - len(prefix)))
    for side in ("chosen", "rejected"):
        if pair[f"{side}_ids"][0] != close_id:
            raise ValueError(f"'>' + {side} does not start with the '>' token {close_id}: {row[side]!r}")
        pair[f"{side}_ids"] = prefix + pair[f"{side}_ids"]
    return {**pair, "belief_len": len(prefix), "level_ids": level_ids, "target": list(row["target"])}


def encode_levels(tokenizer: Any, row: dict, **lengths: int) -> dict:
    """A DPO-baseline pair of `gdpo_rows_as_pairs`: `encode_pair`, plus the level digits' ids and its
    `level_target` as `target`, for the alignment gap; both completions must start with a digit's token."""
    level_ids = [_single_token(tokenizer, str(level), "the level digit") for level in range(len(row[LEVEL_TARGET]))]
    pair = encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], **lengths)
    for side in ("chosen", "rejected"):
        if pair[f"{side}_ids"][0] not in level_ids:
            raise ValueError(f"the {side} completion {row[side][:20]!r}... does not start with a level digit's "
                             f"token {level_ids} (got {pair[f'{side}_ids'][0]})")
    return {**pair, "level_ids": level_ids, "target": list(row[LEVEL_TARGET])}


def collate_gdpo(encoded: list[dict], batch: dict[str, torch.Tensor], *, beliefs: bool) -> dict[str, torch.Tensor]:
    """Add GDPO's tensors to a `collate_pairs` batch of `encode_gdpo` (`beliefs`) or `encode_levels` rows.

    `level_position` (B,) is the input position of the first completion token (the level digit),
    `level_ids` (B, L), `target_probs` (B, L); for GDPO rows (`beliefs`; not the DPO baseline's pairs, which
    train on whole completions) also `chosen_belief_mask` (B, T), marking the belief prefix tokens, and the
    completion masks then cover only '>' + answer.
    """
    batch["level_position"] = torch.tensor([len(e["prompt_ids"]) for e in encoded])
    batch["level_ids"] = torch.tensor([list(e["level_ids"]) for e in encoded])
    batch["target_probs"] = torch.tensor([list(e["target"]) for e in encoded], dtype=torch.float64)
    if not beliefs:
        return batch
    belief = torch.zeros_like(batch["chosen_completion_mask"])
    for i, e in enumerate(encoded):
        start = len(e["prompt_ids"])
        belief[i, start:start + e["belief_len"]] = 1
        for side in ("chosen", "rejected"):
            batch[f"{side}_completion_mask"][i, start:start + e["belief_len"]] = 0
    batch["chosen_belief_mask"] = belief
    return batch
