"""From a `LossConfig` and a batch's log-probs to the per-example loss and TRL-named metrics.

The training stages call `pair_loss` / `group_loss` with whatever they computed; the math itself lives in
`rayalign.core.losses` and which function a `loss.type` is, with its keyword arguments, in the one table
`rayalign.loss_registry.LOSSES`. This binds the table's rows to the functions and builds their arguments,
so every trainer (the in-process oracle, Ray Train) applies the same defaults. It does no forward pass.
"""

from __future__ import annotations

import math

import torch

from rayalign.config import ConfigError, LossConfig
from rayalign.core import losses as L
from rayalign.core.metrics import reward_accuracy
from rayalign.data_kind import BELIEFS
from rayalign.loss_registry import (  # noqa: F401 (re-exported: the trainers import them from here)
    GROUP_LOSSES,
    LOSSES,
    PAIR_LOSSES,
    SOFT_LABEL_LOSSES,
    THETA,
    LossSpec,
    needs_dispersion,
    uses_mean_logps,
)


def loss_function(loss_type: str):
    """The `rayalign.core.losses` function of a `loss.type` (its row's `function`)."""
    return getattr(L, LOSSES[loss_type].function)


def _options(spec: LossSpec, config: LossConfig) -> dict:
    return {keyword: getattr(config, field) for keyword, field in spec.options}


def mallows_scale(config: LossConfig, unit_neg_log_dispersion: torch.Tensor) -> float:
    """c in k = -c ln H: the configured number, or with `auto` 1 / mean(-ln H) over the training set."""
    if config.mallows_scale == "auto":
        return 1.0 / float(unit_neg_log_dispersion.mean())
    return float(config.mallows_scale)


def unit_dispersion(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """-ln H per pair (MallowsPO's k with c = 1) from the cached reference entropies (`ENTROPY_KEYS`)."""
    return L.mallows_neg_log_dispersion(columns["ref_chosen_entropy"], columns["ref_rejected_entropy"],
                                        vocab_size=int(columns["ref_vocab_size"][0]), scale=1.0)


def _smoothing(spec: LossSpec, config: LossConfig, per_example: torch.Tensor | None) -> dict:
    if per_example is not None and not spec.per_example_smoothing:
        raise ConfigError(f"loss.type: per-example label smoothing needs loss.type={'/'.join(SOFT_LABEL_LOSSES)}, "
                          f"got {spec.name}")
    if spec.label_smoothing is None:
        return {}
    if per_example is not None:
        return {"label_smoothing": per_example}
    return {"label_smoothing": spec.label_smoothing if config.label_smoothing is None else config.label_smoothing}


def _dispersion(spec: LossSpec, config: LossConfig, neg_log_dispersion: torch.Tensor | None) -> dict:
    if spec.dispersion is None:
        return {}
    if needs_dispersion(config) and neg_log_dispersion is None:
        raise ValueError(f"loss.type={spec.name} needs neg_log_dispersion from the reference entropies")
    if spec.dispersion == THETA:
        return {"neg_log_dispersion": neg_log_dispersion}
    phi = torch.exp(-neg_log_dispersion) if config.mallows_phi == "entropy" else float(config.mallows_phi)
    return {"phi": phi}


def _beliefs(spec: LossSpec, gdpo: dict[str, torch.Tensor] | None) -> dict:
    if spec.data != BELIEFS:
        return {}
    if gdpo is None:
        raise ValueError(f"loss.type={spec.name} needs level_logps, target_probs and belief_mean_logps")
    return {"level_logps": gdpo["level_logps"], "target_probs": gdpo["target_probs"].to(gdpo["level_logps"].dtype),
            "belief_mean_logps": gdpo["belief_mean_logps"]}


def pair_loss(
    config: LossConfig,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    neg_log_dispersion: torch.Tensor | None = None,
    label_smoothing: torch.Tensor | None = None,
    gdpo: dict[str, torch.Tensor] | None = None,
) -> L.LossOutput:
    """Per-example loss (B,) of the configured pairwise loss.

    `label_smoothing` (B,) replaces the config's epsilon for the losses that take per-example soft labels
    (DPO: SPA's self-refinement); `neg_log_dispersion` (B,) is k = -c ln H for the MallowsPO losses; `gdpo`
    holds GDPO's `level_logps` (B, L), `target_probs` (B, L) and `belief_mean_logps` (B,).
    """
    spec = LOSSES[config.type]
    if spec.is_group:
        raise ConfigError(f"loss.type: {config.type} is not a pairwise loss on (chosen, rejected) log-probs; "
                          f"the pairwise losses are {', '.join(PAIR_LOSSES)}")
    kwargs = {**_options(spec, config), **_smoothing(spec, config, label_smoothing),
              **_dispersion(spec, config, neg_log_dispersion), **_beliefs(spec, gdpo)}
    return loss_function(config.type)(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps, **kwargs)


def group_loss(config: LossConfig, policy_logps: torch.Tensor, ref_logps: torch.Tensor,
               rewards: torch.Tensor) -> L.GroupLossOutput:
    """Per-group loss (B,) of a K-sample loss (EXO-rw, DPO-rw) on (B, K) log-probs and rewards (ALGORITHMS.md §4).

    `loss.beta` is beta_pi and `loss.beta_r` the reward temperature.
    """
    spec = LOSSES[config.type]
    if not spec.is_group:
        raise ConfigError(f"loss.type: {config.type} is not a K-sample loss; those are {', '.join(GROUP_LOSSES)}")
    return loss_function(config.type)(policy_logps, ref_logps, rewards, **_options(spec, config))


METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def pair_metric_sums(
    losses: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """(count, then one sum per `METRIC_NAMES`) in float64: sums add up across micro-batches and workers.

    Rewards come from summed log-ratios for every loss, as TRL logs them.
    """
    with torch.no_grad():
        chosen = beta * (policy_chosen_logps - ref_chosen_logps).double()
        rejected = beta * (policy_rejected_logps - ref_rejected_logps).double()
        columns = (losses.double(), chosen, rejected, reward_accuracy(chosen, rejected), chosen - rejected,
                   policy_chosen_logps.double(), policy_rejected_logps.double())
        count = torch.tensor(float(losses.numel()), dtype=torch.float64, device=losses.device)
        return torch.stack([count] + [c.sum() for c in columns])


def metrics_from_sums(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Means from `pair_metric_sums` (possibly summed over workers); raises on a non-finite value."""
    count = float(sums[0])
    metrics = {prefix + name: float(value) / max(count, 1.0) for name, value in zip(METRIC_NAMES, sums[1:])}
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise FloatingPointError(f"non-finite training metrics: {', '.join(bad)}")
    return metrics


def pair_metrics(*tensors: torch.Tensor, beta: float) -> dict[str, float]:
    """TRL-named means of one batch: `metrics_from_sums(pair_metric_sums(...))`."""
    return metrics_from_sums(pair_metric_sums(*tensors, beta=beta))
