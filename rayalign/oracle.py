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

from rayalign.batching import collate_pairs, encode_pair
from rayalign.config import Config, ConfigError
from rayalign.core.logprobs import concatenated_forward, sequence_logps, sequence_mean_entropy
from rayalign.core.losses import mallows_neg_log_dispersion
from rayalign.objective import (
    IN_PROCESS_LOSSES,
    mallows_scale,
    needs_dispersion,
    pair_loss,
    pair_metrics,
    uses_mean_logps,
)
from rayalign.optim import build_optimizer, build_scheduler


@dataclass
class EncodedPairs:
    """Token ids of every pair plus what truncation did to them."""

    items: list[dict]
    prompts_truncated: int
    completions_truncated: int


def encode_pairs(rows: list[dict], tokenizer, config: Config) -> EncodedPairs:
    items = [encode_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"],
                         max_prompt_length=config.data.max_prompt_length,
                         max_completion_length=config.data.max_completion_length) for r in rows]
    return EncodedPairs(items, sum(e["prompt_truncated"] for e in items), sum(e["completion_truncated"] for e in items))


def _forward(model, batch: dict, *, want_logits: bool, temperature: float):
    keys = [f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "completion_mask")]
    return concatenated_forward(model, *(batch[k] for k in keys), logit_temperature=temperature,
                                return_logits=want_logits)


@torch.no_grad()
def reference_values(reference, encoded: list[dict], *, pad_token_id: int, config: Config, batch_size: int = 16):
    """Per pair: summed and mean reference log-probs and mean entropies (nats/token) of chosen and rejected."""
    out = {k: [] for k in ("chosen", "rejected", "chosen_mean", "rejected_mean", "chosen_entropy",
                           "rejected_entropy")}
    for start in range(0, len(encoded), batch_size):
        batch = collate_pairs(encoded[start:start + batch_size], pad_token_id=pad_token_id)
        result = _forward(reference, batch, want_logits=True, temperature=config.loss.logit_temperature)
        sums = sequence_logps(result.logits, result.labels, result.mask)
        means = sequence_logps(result.logits, result.labels, result.mask, average=True)
        entropies = sequence_mean_entropy(result.logits, result.mask)
        for name, values in (("", sums), ("_mean", means), ("_entropy", entropies)):
            # at least float32 (bf16 models), float64 kept (exactness tests)
            chosen, rejected = values.to(torch.promote_types(values.dtype, torch.float32)).chunk(2)
            out[f"chosen{name}"].append(chosen)
            out[f"rejected{name}"].append(rejected)
    values = {k: torch.cat(v) for k, v in out.items()}
    values["vocab_size"] = int(result.logits.shape[-1])
    return values


def _dispersion(config: Config, ref: dict) -> torch.Tensor | None:
    if not needs_dispersion(config.loss):
        return None
    unit = mallows_neg_log_dispersion(ref["chosen_entropy"], ref["rejected_entropy"],
                                      vocab_size=ref["vocab_size"], scale=1.0)
    return unit * mallows_scale(config.loss, unit)


def _micro_step(policy, batch, index, ref, dispersion, config: Config, denominator: int):
    result = _forward(policy, batch, want_logits=uses_mean_logps(config.loss.type),
                      temperature=config.loss.logit_temperature)
    chosen, rejected = result.chosen_logps, result.rejected_logps
    ref_chosen, ref_rejected = ref["chosen"][index], ref["rejected"][index]
    if uses_mean_logps(config.loss.type):
        mean_chosen, mean_rejected = sequence_logps(result.logits, result.labels, result.mask, average=True).chunk(2)
        loss_args = (mean_chosen, mean_rejected, ref["chosen_mean"][index], ref["rejected_mean"][index])
    else:
        loss_args = (chosen, rejected, ref_chosen, ref_rejected)
    k = dispersion[index] if dispersion is not None else None
    output = pair_loss(config.loss, *loss_args, neg_log_dispersion=k)
    (output.losses.sum() / denominator).backward()
    tokens = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return output.losses.detach(), chosen.detach(), rejected.detach(), ref_chosen, ref_rejected, tokens


def total_steps(num_pairs: int, config: Config) -> int:
    per_epoch = math.ceil(num_pairs / config.train.global_batch_size)
    return min(per_epoch * config.train.epochs, config.train.max_steps or per_epoch * config.train.epochs)


def _step_batches(num_pairs: int, config: Config):
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
    if config.loss.type not in IN_PROCESS_LOSSES:
        raise ConfigError(f"loss.type: the in-process trainer runs {', '.join(IN_PROCESS_LOSSES)}; "
                          f"{config.loss.type} needs the Ray Train stage")
    encoded = encode_pairs(rows, tokenizer, config).items
    ref = reference_values(reference, encoded, pad_token_id=tokenizer.pad_token_id, config=config)
    dispersion = _dispersion(config, ref)
    steps = total_steps(len(encoded), config)
    optimizer = build_optimizer(policy.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps)
    micro_splits = config.train.num_workers * config.train.gradient_accumulation_steps
    policy.train()
    history = []
    for step, (epoch, indices) in enumerate(_step_batches(len(encoded), config)):
        if step >= steps:
            break
        started = time.perf_counter()
        parts = []
        micro = math.ceil(len(indices) / micro_splits)
        for start in range(0, len(indices), micro):
            index = torch.tensor(indices[start:start + micro])
            batch = collate_pairs([encoded[i] for i in index.tolist()], pad_token_id=tokenizer.pad_token_id)
            parts.append(_micro_step(policy, batch, index, ref, dispersion, config, len(indices)))
        clip = config.optim.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), clip))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        columns = [torch.cat(c) if isinstance(c[0], torch.Tensor) else sum(c) for c in zip(*parts)]
        metrics = pair_metrics(*columns[:5], beta=config.loss.beta)
        seconds = time.perf_counter() - started
        metrics.update(step=step + 1, epoch=epoch, lr=lr, grad_norm=grad_norm, tokens_per_s=columns[5] / seconds)
        history.append(metrics)
        if on_step:
            on_step(metrics)
    policy.eval()
    return history
