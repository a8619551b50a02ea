"""From a `LossConfig` and a batch's log-probs to the per-example loss and TRL-named metrics.

The training stages call `pair_loss` with whatever they computed; the math itself lives in
`rayalign.core.losses`. This is the one place that maps config names to loss keyword arguments, so
every trainer (the in-process oracle, Ray Train) applies the same defaults. It does no forward pass.
"""

from __future__ import annotations

import math

import torch

from rayalign.config import ConfigError, LossConfig
from rayalign.core import losses as L
from rayalign.core.metrics import reward_accuracy

EXO_DEFAULT_SMOOTHING = 1e-3  # the EXO paper and TRL (ALGORITHMS.md §4)
PAIR_LOSSES = ("dpo", "ipo", "hinge", "exo_pref", "mallows_theta", "mallows_phi", "gdpo")
GROUP_LOSSES = ("exo_rw", "dpo_rw")  # on K-sample groups: `group_loss`, `rayalign.group_step`
IN_PROCESS_LOSSES = PAIR_LOSSES + GROUP_LOSSES


def uses_mean_logps(loss_type: str) -> bool:
    """IPO is defined on per-token mean log-probs (as in TRL); every other loss on sums."""
    return loss_type == "ipo"


def needs_dispersion(config: LossConfig) -> bool:
    """Whether the loss needs MallowsPO's neg-log dispersion from the reference entropies."""
    return config.type == "mallows_theta" or (config.type == "mallows_phi" and config.mallows_phi == "entropy")


def mallows_scale(config: LossConfig, unit_neg_log_dispersion: torch.Tensor) -> float:
    """c in k = -c ln H: the configured number, or with `auto` 1 / mean(-ln H) over the training set."""
    if config.mallows_scale == "auto":
        return 1.0 / float(unit_neg_log_dispersion.mean())
    return float(config.mallows_scale)


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

    `label_smoothing` (B,) replaces the config's epsilon for DPO (SPA's soft labels);
    `neg_log_dispersion` (B,) is k = -c ln H for the MallowsPO losses; `gdpo` holds GDPO's
    `level_logps` (B, L), `target_probs` (B, L) and `belief_mean_logps` (B,).
    """
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    beta, kind = config.beta, config.type
    if kind == "dpo":
        eps = label_smoothing if label_smoothing is not None else (config.label_smoothing or 0.0)
        return L.dpo_loss(*args, beta=beta, label_smoothing=eps)
    if label_smoothing is not None:
        raise ConfigError(f"loss.type: per-example label smoothing needs loss.type=dpo, got {kind}")
    if kind == "ipo":
        return L.ipo_loss(*args, beta=beta)
    if kind == "hinge":
        return L.hinge_loss(*args, beta=beta)
    if kind == "exo_pref":
        eps = config.label_smoothing if config.label_smoothing is not None else EXO_DEFAULT_SMOOTHING
        return L.exo_pref_loss(*args, beta=beta, label_smoothing=eps)
    if kind in ("mallows_theta", "mallows_phi") and needs_dispersion(config) and neg_log_dispersion is None:
        raise ValueError(f"loss.type={kind} needs neg_log_dispersion from the reference entropies")
    if kind == "mallows_theta":
        eps = config.label_smoothing or 0.0
        return L.mallows_theta_loss(*args, beta=beta, neg_log_dispersion=neg_log_dispersion, label_smoothing=eps)
    if kind == "mallows_phi":
        phi = torch.exp(-neg_log_dispersion) if config.mallows_phi == "entropy" else float(config.mallows_phi)
        return L.mallows_phi_loss(*args, beta=beta, phi=phi)
    if kind == "gdpo":
        if gdpo is None:
            raise ValueError("loss.type=gdpo needs level_logps, target_probs and belief_mean_logps")
        target = gdpo["target_probs"].to(gdpo["level_logps"].dtype)
        return L.gdpo_loss(*args, beta=beta, level_logps=gdpo["level_logps"], target_probs=target,
                           belief_mean_logps=gdpo["belief_mean_logps"],
                           calibration_weight=config.gdpo_calibration_weight,
                           belief_nll_weight=config.gdpo_belief_nll_weight)
    raise ConfigError(f"loss.type: {kind} is not a pairwise loss on (chosen, rejected) log-probs; "
                      f"the pairwise losses are {', '.join(PAIR_LOSSES)}")


def group_loss(config: LossConfig, policy_logps: torch.Tensor, ref_logps: torch.Tensor,
               rewards: torch.Tensor) -> L.GroupLossOutput:
    """Per-group loss (B,) of EXO-rw or DPO-rw on (B, K) log-probs and rewards (ALGORITHMS.md §4).

    `loss.beta` is beta_pi and `loss.beta_r` the reward temperature.
    """
    losses = {"exo_rw": L.exo_rw_loss, "dpo_rw": L.dpo_rw_loss}
    if config.type not in losses:
        raise ConfigError(f"loss.type: {config.type} is not a K-sample loss; those are {', '.join(GROUP_LOSSES)}")
    return losses[config.type](policy_logps, ref_logps, rewards, beta_pi=config.beta, beta_r=config.beta_r)


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
