"""K-sample groups -> token ids -> one right-padded (B*K, T) batch: the data side of EXO-rw and DPO-rw.

A group is one prompt, K sampled completions and a reward per completion (the "k_sample" format,
`{prompt, completions[K], rewards[K]}`). The prompt is tokenized once and each completion on its own,
exactly as `rayalign.batching.encode_pair` does for a pair (`rayalign.templating`: ending at eos, the
*end* of a long prompt and the *start* of a long completion kept, with flags saying so). Collation puts
completion k of group b at row b*K + k, so one forward over the batch gives log-probs that `.view(B, K)`
turns back into groups.
`rayalign.encode` hands rows of the GROUPS kind here, so the oracle, the Ray Data preparation and the
workers carry groups through the same calls as pairs.

It does not read files, run a model or know of the losses (that is `rayalign.group_step`).
"""

from __future__ import annotations

from typing import Any

import torch

from rayalign.batching import pad_rows
from rayalign.config import ConfigError
from rayalign.templating import completion_ids, prompt_ids, render_prompt

GROUP_REF_KEY = "ref_logps"  # cached reference log-probs of a group: (K,) per row, (B, K) in a batch


def encode_group(tokenizer: Any, row: dict, *, max_prompt_length: int, max_completion_length: int) -> dict:
    """Token ids of one group: {prompt_ids, completion_ids[K], rewards[K], prompt_truncated,
    completion_truncated} (the latter: whether any of the K completions was cut)."""
    prompt, text = row["prompt"], render_prompt(tokenizer, row["prompt"])
    ids, prompt_truncated = prompt_ids(tokenizer, prompt, max_prompt_length, prompt_text=text)
    completions = [completion_ids(tokenizer, prompt, c, max_completion_length, prompt_text=text)
                   for c in row["completions"]]
    return {"prompt_ids": ids, "completion_ids": [c for c, _ in completions],
            "rewards": [float(r) for r in row["rewards"]], "prompt_truncated": prompt_truncated,
            "completion_truncated": any(cut for _, cut in completions)}


def collate_groups(encoded: list[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad B groups of K completions into one batch.

    Returns `input_ids`, `attention_mask`, `completion_mask` of shape (B*K, T) (row b*K + k is completion
    k of group b; the completion mask marks its tokens, EOS included) and `rewards` (B, K) float64.
    Every group of a batch must have the same K.
    """
    sizes = sorted({len(e["completion_ids"]) for e in encoded})
    if len(sizes) != 1:
        raise ValueError(f"a batch of groups needs one group size K; got K = {sizes}")
    ids = [list(e["prompt_ids"]) + list(c) for e in encoded for c in e["completion_ids"]]
    completion = [[0] * len(e["prompt_ids"]) + [1] * len(c) for e in encoded for c in e["completion_ids"]]
    length = max(len(row) for row in ids)
    return {"input_ids": pad_rows(ids, length, pad_token_id),
            "attention_mask": pad_rows([[1] * len(row) for row in ids], length, 0),
            "completion_mask": pad_rows(completion, length, 0),
            "rewards": torch.tensor([list(e["rewards"]) for e in encoded], dtype=torch.float64)}


def check_group_rows(rows: list[dict], source: str) -> None:
    """Training batches need one K: say so up front rather than at the first mixed batch."""
    sizes = sorted({len(r["completions"]) for r in rows})
    if len(sizes) > 1:
        raise ConfigError(f"data.train_file: K-sample training needs the same K in every row of {source}; "
                          f"found K = {', '.join(map(str, sizes))}")


def encoded_group_rows(frame) -> list[dict]:
    """The rows of a prepared (Parquet / Ray Data) frame of groups as `collate_groups` takes them.

    Nested list columns come back from Arrow as arrays of arrays; they become plain lists here.
    """
    return [{"prompt_ids": [int(t) for t in prompt], "completion_ids": [[int(t) for t in c] for c in completions],
             "rewards": [float(r) for r in rewards]}
            for prompt, completions, rewards in zip(frame["prompt_ids"], frame["completion_ids"], frame["rewards"])]


def group_reference_column(frame) -> dict[str, torch.Tensor]:
    """{GROUP_REF_KEY: (N, K) float64} from a prepared frame's cached list column, or {} if it has none."""
    if GROUP_REF_KEY not in frame:
        return {}
    return {GROUP_REF_KEY: torch.tensor([[float(v) for v in row] for row in frame[GROUP_REF_KEY]],
                                        dtype=torch.float64)}
