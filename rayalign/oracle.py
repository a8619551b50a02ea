"""A single-process, obviously-correct pairwise preference trainer: the oracle.

It runs the whole update in one Python loop on one device: reference log-probs once, then for each
optimizer step the global batch split into micro-batches (workers x accumulation of them, summed, so
the result does not depend on how the batch is split), gradient clipping, the schedule. The Ray Train
stage is tested against it, and `rayalign run` uses it until the on-policy loop lands.

It deliberately has no Ray, no DeepSpeed, no checkpoints and no resume: keep it slow and plain.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayalign.batching import collate_pairs, encode_row
from rayalign.config import Config
from rayalign.core.losses import mallows_neg_log_dispersion
from rayalign.group_batching import GROUP_REF_KEY
from rayalign.objective import mallows_scale, needs_dispersion, pair_metrics
from rayalign.optim import build_optimizer, build_scheduler
from rayalign.step import REF_KEYS, micro_batch_loss, reference_scores


@dataclass
class EncodedPairs:
    """Token ids of every pair plus what truncation did to them."""

    items: list[dict]
    prompts_truncated: int
    completions_truncated: int


def encode_pairs(rows: list[dict], tokenizer, config: Config) -> EncodedPairs:
    items = [encode_row(tokenizer, r, max_prompt_length=config.data.max_prompt_length,
                        max_completion_length=config.data.max_completion_length) for r in rows]
    return EncodedPairs(items, sum(e["prompt_truncated"] for e in items), sum(e["completion_truncated"] for e in items))


@torch.no_grad()
def reference_columns(reference, encoded: list[dict], *, pad_token_id: int, config: Config,
                      batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per-pair reference columns (`REF_KEYS`, plus `ENTROPY_KEYS` when the loss needs them), each (N,)."""
    want_entropy = needs_dispersion(config.loss)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[start:start + batch_size], pad_token_id=pad_token_id)
        for key, value in reference_scores(reference, batch, config, want_entropy=want_entropy).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def unit_dispersion(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """-ln H per pair (MallowsPO's k with c = 1) from the cached reference entropies."""
    return mallows_neg_log_dispersion(columns["ref_chosen_entropy"], columns["ref_rejected_entropy"],
                                      vocab_size=int(columns["ref_vocab_size"][0]), scale=1.0)


def dispersion(config: Config, columns: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """MallowsPO's k = -c ln H per pair (c fixed, or `auto` from these pairs), or None if unused."""
    if not needs_dispersion(config.loss):
        return None
    unit = unit_dispersion(columns)
    return unit * mallows_scale(config.loss, unit)


def collate_with_reference(encoded: list[dict], columns: dict, index: torch.Tensor, *, pad_token_id: int) -> dict:
    batch = collate_pairs([encoded[i] for i in index.tolist()], pad_token_id=pad_token_id)
    # Without a cache (`ref.cache=false`) there are no columns: the step runs the reference itself.
    batch.update({key: columns[key][index] for key in (*REF_KEYS, GROUP_REF_KEY) if key in columns})
    return batch


def total_steps(num_pairs: int, config: Config) -> int:
    per_epoch = math.ceil(num_pairs / config.train.global_batch_size)
    return min(per_epoch * config.train.epochs, config.train.max_steps or per_epoch * config.train.epochs)


def step_batches(num_pairs: int, config: Config):
    """Global batches of pair indices: a seeded shuffle per epoch, the last partial batch kept."""
    size = config.train.global_batch_size
    for epoch in range(config.train.epochs):
        order = list(range(num_pairs))
        random.Random(config.train.seed + epoch).shuffle(order)
        for start in range(0, num_pairs, size):
            yield epoch, order[start:start + size]


def train_pairs(
    policy, reference, tokenizer, rows: list[dict], config: Config,
    *, on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `policy` in place on preference `rows`; returns one TRL-named metrics dict per step."""
    encoded = encode_pairs(rows, tokenizer, config).items
    pad = tokenizer.pad_token_id
    columns = reference_columns(reference, encoded, pad_token_id=pad, config=config)
    k = dispersion(config, columns)
    steps = total_steps(len(encoded), config)
    optimizer = build_optimizer(policy.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps)
    micro_splits = config.train.num_workers * config.train.gradient_accumulation_steps
    selector = None
    if config.sams.enabled:
        from rayalign.sams_select import PairSelector

        selector = PairSelector(config, num_layers=policy.config.num_hidden_layers,
                                hidden_size=policy.config.hidden_size, total_steps=steps)
    policy.train()
    history = []
    for step, (epoch, indices) in enumerate(step_batches(len(encoded), config)):
        if step >= steps:
            break
        started = time.perf_counter()
        parts = []
        micro = math.ceil(len(indices) / micro_splits)
        outputs = []
        for start in range(0, len(indices), micro):
            index = torch.tensor(indices[start:start + micro])
            batch = collate_with_reference(encoded, columns, index, pad_token_id=pad)
            out = micro_batch_loss(policy, batch, config, neg_log_dispersion=None if k is None else k[index],
                                   want_context=selector is not None)
            if selector is None:
                (out.losses.sum() / len(indices)).backward()
            outputs.append(out)
            parts.append((out.losses.detach(), out.policy_chosen_logps, out.policy_rejected_logps,
                          out.ref_chosen_logps, out.ref_rejected_logps, out.tokens))
        if selector is not None:
            _sams_backward(selector, outputs, beta=config.loss.beta)
        clip = config.optim.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stacked = [torch.cat(c) if isinstance(c[0], torch.Tensor) else sum(c) for c in zip(*parts)]
        metrics = pair_metrics(*stacked[:5], beta=config.loss.beta)
        seconds = time.perf_counter() - started
        metrics.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=grad_norm, tokens_per_s=stacked[5] / seconds)
        metrics.update(selector.metrics() if selector else {})
        history.append(metrics)
        if on_step:
            on_step(metrics)
    policy.eval()
    return history


def _sams_backward(selector, outputs: list, *, beta: float) -> None:
    """SamS on one process: every micro-batch's graph is kept, the selector sees the whole batch, and the
    backward covers the mean loss of the chosen pairs only (the workers do the same per shard)."""
    from rayalign.sams_select import pair_margins

    losses = torch.cat([o.losses for o in outputs])
    margins = torch.cat([pair_margins(o.policy_chosen_logps, o.policy_rejected_logps, o.ref_chosen_logps,
                                      o.ref_rejected_logps, beta=beta) for o in outputs])
    mask = selector.select(start=0, n=losses.shape[0], losses=losses.detach(), margins=margins,
                           chosen_logps=torch.cat([o.policy_chosen_logps for o in outputs]),
                           context=torch.cat([o.context for o in outputs]))
    ((losses * mask.to(losses.dtype)).sum() / int(mask.sum())).backward()
