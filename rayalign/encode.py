"""Rows of any data kind -> token ids -> training batches, dispatching on the kind decided once per run.

The kind (`rayalign.data_kind`: PAIRS, LEVEL_PAIRS, BELIEFS, GROUPS) comes from `data_kind.decide` (the
driver) or `data_kind.of_rows` (the in-process oracle) and is passed to every function here; nothing here
guesses it from the keys of a row, a frame or a batch. The encoders and collators themselves are
`rayalign.batching` (pairs, GDPO) and `rayalign.group_batching` (K-sample groups).

Used by the Ray Data preparation (`rayalign.prepare`), the training workers (`rayalign.train_loop`) and
the in-process oracle alike. No model, no Ray.
"""

from __future__ import annotations

from typing import Any

import torch

from rayalign.batching import collate_gdpo, collate_pairs, encode_gdpo, encode_levels, encode_pair
from rayalign.data_kind import BELIEFS, GROUPS, LEVEL_KINDS, LEVEL_PAIRS, LEVEL_TARGET, PAIRS
from rayalign.group_batching import GROUP_REF_KEY, collate_groups, encode_group, encoded_group_rows
from rayalign.step import REF_KEYS

# The fields of a data row each kind's encoder reads (and the Ray Data encoder is handed).
TEXT_FIELDS = {
    PAIRS: ("prompt", "chosen", "rejected"),
    LEVEL_PAIRS: ("prompt", "chosen", "rejected", LEVEL_TARGET),
    BELIEFS: ("prompt", "chosen", "rejected", "target", "belief", "belief_text"),
    GROUPS: ("prompt", "completions", "rewards"),
}
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# The columns of a prepared frame each pair kind collates from (groups: `encoded_group_rows`).
ENCODED_COLUMNS = {
    PAIRS: ID_COLUMNS,
    LEVEL_PAIRS: (*ID_COLUMNS, "level_ids", "target"),
    BELIEFS: (*ID_COLUMNS, "belief_len", "level_ids", "target"),
}


def encode_row(tokenizer: Any, row: dict, kind: str, **lengths: int) -> dict:
    """Token ids of one row of `kind`: `encode_pair`, `encode_levels`, `encode_gdpo` or `encode_group`."""
    if kind == GROUPS:
        return encode_group(tokenizer, row, **lengths)
    if kind == BELIEFS:
        return encode_gdpo(tokenizer, row, **lengths)
    if kind == LEVEL_PAIRS:
        return encode_levels(tokenizer, row, **lengths)
    return encode_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], **lengths)


def collate(encoded: list[dict], kind: str, *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of encoded rows of `kind` (see `collate_pairs`, `collate_gdpo`,
    `collate_groups` for the tensors)."""
    if kind == GROUPS:
        return collate_groups(encoded, pad_token_id=pad_token_id)
    batch = collate_pairs(encoded, pad_token_id=pad_token_id)
    if kind in LEVEL_KINDS:  # GDPO rows, or the DPO baseline on them (its eval reads the levels)
        return collate_gdpo(encoded, batch, beliefs=kind == BELIEFS)
    return batch


def encoded_rows(frame, kind: str) -> list[dict]:
    """Rows of a prepared (Parquet / Ray Data, pandas) frame of `kind` as `collate` takes them."""
    if kind == GROUPS:
        return encoded_group_rows(frame)
    keys = ENCODED_COLUMNS[kind]
    return [{k: (list(row[k]) if k != "belief_len" else int(row[k])) for k in keys} for _, row in frame.iterrows()]


def collate_with_reference(encoded: list[dict], columns: dict, index: torch.Tensor, *, kind: str,
                           pad_token_id: int) -> dict:
    """The batch of rows `index` with their cached reference columns (`REF_KEYS`, or a group's
    `ref_logps`) when `columns` has them; without a cache (`ref.cache=false`) the step runs the reference."""
    batch = collate([encoded[i] for i in index.tolist()], kind, pad_token_id=pad_token_id)
    batch.update({key: columns[key][index] for key in (*REF_KEYS, GROUP_REF_KEY) if key in columns})
    return batch
