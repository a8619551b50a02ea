"""A single-process, obviously-correct pairwise preference trainer: the oracle.

It runs the whole update in one Python loop on one device: reference log-probs once, then for each
optimizer step the global batch split into micro-batches (workers x accumulation of them, summed, so
the result does not depend on how the batch is split), gradient clipping, the schedule, SamS selection
and SPA self-refinement (`spa.refine`, on `rayalign.core.spa`). The Ray Train stage is tested against it.
It shares with the workers only the step (`rayalign.step`), the batch order (`rayalign.data_order`) and the
encoding (`rayalign.encode`); the workers import nothing from here.

It deliberately has no Ray, no DeepSpeed, no checkpoints and no resume: keep it slow and plain.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rayalign import data_kind
from rayalign.config import Config
from rayalign.core.spa import MarginWindow
from rayalign.data_order import micro_batches, step_batches, total_steps
from rayalign.devices import model_device, release_freed_host_memory, training_autocast
from rayalign.encode import collate, collate_with_reference, encode_row
from rayalign.objective import LOSSES, mallows_scale, needs_dispersion, pair_metrics, unit_dispersion
from rayalign.optim import build_optimizer, build_scheduler
from rayalign.stage_inputs import StageInputs
from rayalign.step import RefineSettings, micro_batch_loss, reference_scores


@dataclass
class EncodedPairs:
    """Token ids of every pair plus what truncation did to them."""

    items: list[dict]
    prompts_truncated: int
    completions_truncated: int


def encode_pairs(rows: list[dict], tokenizer, config: Config, kind: str | None = None) -> EncodedPairs:
    """Token ids of rows of data kind `kind` (None: the kind the loss trains on)."""
    kind = kind or LOSSES[config.loss.type].data
    items = [encode_row(tokenizer, r, kind, max_prompt_length=config.data.max_prompt_length,
                        max_completion_length=config.data.max_completion_length) for r in rows]
    return EncodedPairs(items, sum(e["prompt_truncated"] for e in items), sum(e["completion_truncated"] for e in items))


@torch.no_grad()
def reference_columns(reference, encoded: list[dict], *, pad_token_id: int, config: Config, kind: str | None = None,
                      batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Per-pair reference columns (`REF_KEYS`, plus `ENTROPY_KEYS` when the loss needs them), each (N,);
    `kind` as in `encode_pairs`."""
    want_entropy = needs_dispersion(config.loss)
    kind = kind or LOSSES[config.loss.type].data
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start:start + batch_size], kind, pad_token_id=pad_token_id)
        for key, value in reference_scores(reference, batch, config, want_entropy=want_entropy).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


def dispersion(config: Config, columns: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """MallowsPO's k = -c ln H per pair (c fixed, or `auto` from these pairs), or None if unused."""
    if not needs_dispersion(config.loss):
        return None
    unit = unit_dispersion(columns)
    return unit * mallows_scale(config.loss, unit)


class _Refinement:
    """SPA self-refinement on one process (ALGORITHMS.md §5), written plainly on `rayalign.core.spa`: step t
    reads tau from the margins of steps before t (0 until the window is full), soft labels start after the
    warm start, and the step's margins join the window in global batch order (here: micro-batch order)."""

    def __init__(self, config: Config, mix: float, total: int):
        self.spa, self.mix = config.spa, mix
        self.window = MarginWindow(config.spa.window)
        self.warm_steps = math.ceil(config.spa.warm_start * total)

    def settings(self, step: int) -> RefineSettings:
        threshold = self.window.threshold(k_fraction=self.spa.k_fraction)
        return RefineSettings(mix=self.mix, threshold=threshold, alpha=self.spa.alpha, active=step >= self.warm_steps)

    def end_step(self, outputs: list, settings: RefineSettings) -> dict:
        self.window.extend(torch.cat([o.refine_margins for o in outputs]))
        return {"spa/relabelled": sum(o.relabelled for o in outputs), "spa/threshold": settings.threshold,
                "spa/active": int(settings.active)}


def train_pairs(
    policy, reference, tokenizer, rows: list[dict], config: Config,
    *, on_step: Callable[[dict], None] | None = None, kind: str | None = None,
) -> list[dict]:
    """Train `policy` in place on preference `rows`; returns one TRL-named metrics dict per step.

    `kind`: the rows' data kind (`rayalign.data_kind`); None: decided here from the loss and the rows."""
    kind = kind or data_kind.of_rows(LOSSES[config.loss.type], rows)
    encoded = encode_pairs(rows, tokenizer, config, kind).items
    pad = tokenizer.pad_token_id
    columns = reference_columns(reference, encoded, pad_token_id=pad, config=config, kind=kind)
    k = dispersion(config, columns)
    inputs = StageInputs.from_config(config)  # the oracle runs one stage as the config describes it
    steps = total_steps(len(encoded), config.train, inputs.epochs)
    optimizer = build_optimizer(policy.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, steps)
    selector = refinement = None
    if config.sams.enabled:
        from rayalign.sams_select import PairSelector

        selector = PairSelector(config, num_layers=policy.config.num_hidden_layers,
                                hidden_size=policy.config.hidden_size, total_steps=steps)
    if inputs.spa_mix is not None:
        refinement = _Refinement(config, inputs.spa_mix, steps)
    policy.train()
    history, device_type = [], model_device(policy).type
    for step, (epoch, indices) in enumerate(step_batches(len(encoded), config.train, inputs.epochs)):
        if step >= steps:
            break
        started = time.perf_counter()
        refine = refinement.settings(step) if refinement else None
        outputs = []
        for chunk in micro_batches(indices, config.train.num_workers * config.train.gradient_accumulation_steps):
            if not chunk:  # a short last batch: the workers' empty micro-batches count for nothing
                continue
            index = torch.tensor(chunk)
            batch = collate_with_reference(encoded, columns, index, kind=kind, pad_token_id=pad)
            with training_autocast(config.train, device_type):
                out = micro_batch_loss(policy, batch, config, reference=reference if refine else None,
                                       neg_log_dispersion=None if k is None else k[index], refine=refine,
                                       want_context=selector is not None, kind=kind)
            if selector is None:
                (out.losses.sum() / len(indices)).backward()
            outputs.append(out)
        if selector is not None:
            _sams_backward(selector, outputs, beta=config.loss.beta)
        metrics = _optimizer_step(policy, optimizer, scheduler, config, outputs)
        seconds = time.perf_counter() - started
        metrics.update(step=step + 1, epoch=epoch, tokens_per_s=sum(o.tokens for o in outputs) / seconds)
        metrics.update(selector.metrics() if selector else {})
        metrics.update(refinement.end_step(outputs, refine) if refinement else {})
        history.append(metrics)
        if on_step:
            on_step(metrics)
    policy.eval()
    return history


def _optimizer_step(policy, optimizer, scheduler, config: Config, outputs: list) -> dict:
    """Clip, step, zero the gradients; the step's TRL-named metrics with its lr and gradient norm."""
    clip = config.optim.max_grad_norm or float("inf")
    release_freed_host_memory()  # as the workers' engine does
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), clip))
    if not math.isfinite(grad_norm):  # as the workers' engines: never step on an inf/nan gradient
        raise FloatingPointError(f"non-finite gradient norm ({grad_norm}); the step was not taken")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    columns = [torch.cat(c) for c in zip(*((o.losses.detach(), o.policy_chosen_logps, o.policy_rejected_logps,
                                            o.ref_chosen_logps, o.ref_rejected_logps) for o in outputs))]
    return {**pair_metrics(*columns, beta=config.loss.beta), "lr": lr, "grad_norm": grad_norm}


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
