"""Per-example preference losses: DPO family, MallowsPO, GDPO and EXO (docs: spec/ALGORITHMS.md §1–§4).

Every function takes sequence log-probs (already summed, or per-token averaged for IPO) and returns
per-example losses of shape (B,) plus detached rewards; the caller reduces (mean, selection, weighting).
Pairwise losses return `LossOutput(losses, chosen_rewards, rejected_rewards)` with rewards β·Δ;
K-sample losses return `GroupLossOutput(losses, rewards)` with rewards β_π·Δ of shape (B, K).
Hyper-parameters are keyword-only. Everything stays finite for log-probs of ±1e4 and β·margins of ±1e3.

Not here: computing log-probs from logits (`logprobs.py`), reductions, SPA's judging and thresholds
(`spa.py`), SamS selection (`sams.py`), and any configuration handling: which function a `loss.type` is,
and which keyword arguments it gets, is the table `rayalign.loss_registry.LOSSES`.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rayalign.core import _mallows


class LossOutput(NamedTuple):
    losses: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor  # (B,), β·Δ(y_w), detached
    rejected_rewards: torch.Tensor  # (B,), β·Δ(y_l), detached


class GroupLossOutput(NamedTuple):
    losses: torch.Tensor  # (B,)
    rewards: torch.Tensor  # (B, K), β_π·Δ(y_i), detached


Smoothing = float | torch.Tensor


def _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def _pair_output(losses, chosen_logratios, rejected_logratios, beta: float) -> LossOutput:
    return LossOutput(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_smoothing(label_smoothing: Smoothing) -> None:
    # A tensor is not checked: reading its values would force a device sync every step.
    if not isinstance(label_smoothing, torch.Tensor) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: Smoothing) -> torch.Tensor:
    """−(1−ε)·logσ(z) − ε·logσ(−z); ε a float or a (B,) tensor."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: Smoothing = 0.0,
) -> LossOutput:
    """DPO (Rafailov et al. 2023, Eq. 7) and conservative DPO (cDPO, Mitchell 2023) for ε > 0.

    loss = −(1−ε)·logσ(u) − ε·logσ(−u),  u = β·[(logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l))].
    Inputs are summed sequence log-probs, shape (B,). `label_smoothing` ε is a float in [0, 1] or a (B,)
    tensor (SPA's self-refinement smooths only the pairs it flags). Returns per-example losses (B,).
    Equals TRL 1.16 `loss_type="sigmoid"` at ε = 0; TRL 1.16 no longer smooths `sigmoid`, so ε > 0 has
    no TRL reference. With ε > 0 the loss has a finite minimum at u = logit(1−ε).
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = _smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return _pair_output(losses, chosen, rejected, beta)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """IPO (Azar et al. 2023, Eq. 17): loss = (Δ_w − Δ_l − 1/(2β))², shapes (B,) -> (B,).

    Pass **per-token mean** log-probs (`sequence_logps(..., average=True)`) for policy and reference:
    that is what TRL 1.16 `ipo` does (length normalisation confirmed with the IPO authors, not in the
    paper), and then this function equals TRL exactly. The rewards returned are β times the log-ratios
    given here, i.e. per-token means; the trainer logs `rewards/*` from summed log-ratios, as TRL does.
    """
    _check_beta(beta)
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return _pair_output(losses, chosen, rejected, beta)


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """SLiC-style hinge on the DPO logit (Zhao et al. 2023; TRL `hinge`): loss = relu(1 − u), (B,) -> (B,)."""
    _check_beta(beta)
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = torch.relu(1 - beta * (chosen - rejected))
    return _pair_output(losses, chosen, rejected, beta)


def exo_pref_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
) -> LossOutput:
    """EXO-pref (Ji et al. ICML 2024, Eq. 16): reverse KL from p_θ = softmax(β_π·Δ) over (chosen, rejected)
    to the target [1−ε, ε]:

    loss = σ(u)·(logσ(u) − log(1−ε)) + σ(−u)·(logσ(−u) − log ε),  shapes (B,) -> (B,).
    `beta` is β_π. ε must lie in (0, 1); TRL 1.16 `exo_pair` is the same formula. Unlike DPO the optimum
    is finite, u* = log((1−ε)/ε). The authors' code hard-codes log ε = −10 (ε ≈ 4.5e-5); we default
    to the paper's and TRL's 1e-3. It is the K = 2 case of `exo_pref_group_loss`.
    """
    _check_beta(beta)
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pref_loss needs label_smoothing (ε) in (0, 1), got {label_smoothing}")
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    u = beta * (chosen - rejected)
    losses = torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-label_smoothing)) + torch.sigmoid(-u) * (
        F.logsigmoid(-u) - math.log(label_smoothing)
    )
    return _pair_output(losses, chosen, rejected, beta)


def exo_pref_group_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen_index: torch.Tensor,
    *,
    beta_pi: float = 0.1,
    label_smoothing: float = 1e-3,
) -> GroupLossOutput:
    """EXO-pref over K samples: KL(p_θ ‖ p_target) with p_θ = softmax_i(β_π·Δ_i) and a target putting
    1−ε on `chosen_index` and ε/(K−1) on each other sample.

    Shapes: `policy_logps`, `ref_logps` (B, K) summed log-probs; `chosen_index` (B,) long -> losses (B,).
    K = 2 equals `exo_pref_loss`. K > 2 is our extension (Ji et al. 2024 and their code are K = 2).
    """
    _check_beta(beta_pi)
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pref_group_loss needs label_smoothing (ε) in (0, 1), got {label_smoothing}")
    num_samples = policy_logps.shape[-1]
    if num_samples < 2:
        raise ValueError(f"exo_pref_group_loss needs K >= 2 samples per prompt, got {num_samples}")
    logratios = policy_logps - ref_logps
    log_q = torch.log_softmax(beta_pi * logratios, dim=-1)
    is_chosen = F.one_hot(chosen_index.long(), num_samples).bool()
    log_target = torch.where(
        is_chosen,
        torch.full_like(log_q, math.log1p(-label_smoothing)),
        torch.full_like(log_q, math.log(label_smoothing / (num_samples - 1))),
    )
    losses = (log_q.exp() * (log_q - log_target)).sum(dim=-1)
    return GroupLossOutput(losses, beta_pi * logratios.detach())


def _group_distributions(policy_logps, ref_logps, rewards, *, beta_pi: float, beta_r: float):
    """Δ, log p_θ = log_softmax(β_π·Δ) and log p_r = log_softmax(r/β_r) over the K samples, (B, K) each."""
    _check_beta(beta_pi)
    _check_beta(beta_r)
    logratios = policy_logps - ref_logps
    return (logratios, torch.log_softmax(beta_pi * logratios, dim=-1),
            torch.log_softmax(rewards.detach() / beta_r, dim=-1))


def exo_rw_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta_pi: float = 0.1,
    beta_r: float = 0.1,
) -> GroupLossOutput:
    """EXO-rw (Ji et al. ICML 2024, Eq. 12): reverse KL between the policy's and the reward model's
    distributions over the K samples of a prompt:

    loss = Σ_i p_θ(i)·(log p_θ(i) − log p_r(i)),  p_θ = softmax(β_π·Δ), p_r = softmax(r/β_r).
    Shapes: all inputs (B, K) -> losses (B,). The target is a constant: `rewards` are detached.
    Zero iff β_π(Δ_i − Δ_j) = (r_i − r_j)/β_r for all i, j. EXO does not reduce to DPO as ε → 0.
    """
    logratios, log_q, log_target = _group_distributions(policy_logps, ref_logps, rewards, beta_pi=beta_pi,
                                                        beta_r=beta_r)
    losses = (log_q.exp() * (log_q - log_target)).sum(dim=-1)
    return GroupLossOutput(losses, beta_pi * logratios.detach())


def dpo_rw_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta_pi: float = 0.1,
    beta_r: float = 0.1,
) -> GroupLossOutput:
    """DPO-rw, the forward-KL baseline of the EXO paper (Ji et al. 2024, Eq. 9):

    loss = −Σ_i p_r(i)·log p_θ(i),  p_θ = softmax(β_π·Δ), p_r = softmax(r/β_r); (B, K) -> (B,).
    With K = 2 and a one-hot target on the chosen sample it is DPO with β = β_π. `rewards` are detached.
    """
    logratios, log_q, log_target = _group_distributions(policy_logps, ref_logps, rewards, beta_pi=beta_pi,
                                                        beta_r=beta_r)
    target = log_target.exp()
    # 0·log q = 0 where the target puts no mass, even if log q is −inf.
    losses = -torch.where(target > 0, target * log_q, torch.zeros_like(log_q)).sum(dim=-1)
    return GroupLossOutput(losses, beta_pi * logratios.detach())


def mallows_neg_log_dispersion(
    ref_chosen_entropy: torch.Tensor,
    ref_rejected_entropy: torch.Tensor,
    *,
    vocab_size: int,
    scale: float = 0.29,
) -> torch.Tensor:
    """MallowsPO's per-pair k = −log ϕ(x) from the reference model's predictive entropy (Chen et al. 2025).

    Inputs: per-sequence mean token entropies in nats, (B,) each (`logprobs.sequence_mean_entropy`).
    H̄ = mean(H_chosen, H_rejected) / ln V, clamped to [1e-6, 1), and k = −scale·ln H̄ -> (B,), detached.
    Follows the authors' code, which normalises by ln V (the paper's printed estimator does not, and
    taken literally gives k < 0). `scale` c = 0.29 is their default; for `mallows_scale=auto` the caller
    computes c = 1 / mean(this function with scale=1.0) over the training set.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    mean_entropy = (ref_chosen_entropy.detach() + ref_rejected_entropy.detach()) / 2
    normalised = (mean_entropy / math.log(vocab_size)).clamp(1e-6, 1 - 1e-6)
    return -scale * torch.log(normalised)


def mallows_theta_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    neg_log_dispersion: torch.Tensor,
    label_smoothing: Smoothing = 0.0,
) -> LossOutput:
    """MallowsPO-θ (Chen et al. ICLR 2025): DPO with the logit scaled per pair by k = −log ϕ(x).

    loss = −(1−ε)·logσ(k·u) − ε·logσ(−k·u); inputs (B,), `neg_log_dispersion` k (B,) (detached here),
    from `mallows_neg_log_dispersion`. k ≡ 1 is DPO; k ≡ c is DPO with β' = c·β. The rewards are the
    unscaled β·Δ, as the authors log them.
    """
    _check_beta(beta)
    _check_smoothing(label_smoothing)
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = neg_log_dispersion.detach() * beta * (chosen - rejected)
    return _pair_output(_smoothed_sigmoid_loss(logits, label_smoothing), chosen, rejected, beta)


def _as_phi(phi: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(phi, torch.Tensor):
        return phi.detach().to(dtype=like.dtype, device=like.device)
    if not 0.0 < phi < 1.0:
        raise ValueError(f"phi must be in (0, 1), got {phi}")
    return torch.full_like(like, phi)


def mallows_phi_link(margins: torch.Tensor, *, phi: float | torch.Tensor) -> torch.Tensor:
    """g_ϕ(s): the Mallows–Kendall probability that the item ranked s places higher is preferred.

    g_ϕ(s) = h(s+1) − h(s), h(k) = k/(1−ϕ^k), for s ≥ 0 (right limit 1/(1−ϕ) + 1/ln ϕ at 0);
    g_ϕ(s) = 1 − g_ϕ(−s) for s < 0. Elementwise; `phi` a float in (0, 1) or a tensor broadcasting
    with `margins`, clamped to [1e-6, 1 − 1e-4].
    """
    return torch.exp(-_mallows.neg_log_link(margins, _as_phi(phi, margins)))


def mallows_phi_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    phi: float | torch.Tensor,
) -> LossOutput:
    """MallowsPO-ϕ (Chen et al. ICLR 2025): loss = −log g_ϕ(s), s = u = β·(Δ_w − Δ_l); see `mallows_phi_link`.

    Inputs (B,); `phi` a float in (0, 1) or a (B,) tensor (detached; e.g. exp(−k) from the entropy
    estimator), clamped to [1e-6, 1 − 1e-4] since near 1 the 1/ln ϕ terms cancel catastrophically.
    Deviation: the link jumps at s = 0 (g(0−) = 1 − g(0+)); we use the s > 0 limit there, not ½, which
    would give zero gradient at initialisation (every s = 0). The authors released no code for this
    variant: this implementation (log-space negative branch, series near 0) is the reference.
    Small ϕ saturates far faster than the sigmoid (1 − g ≈ s(1−ϕ)ϕ^s), a brake on margin growth.
    """
    _check_beta(beta)
    chosen, rejected = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    margins = beta * (chosen - rejected)
    losses = _mallows.neg_log_link(margins, _as_phi(phi, margins))
    return _pair_output(losses, chosen, rejected, beta)


def gdpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    level_logps: torch.Tensor,
    target_probs: torch.Tensor,
    belief_mean_logps: torch.Tensor,
    beta: float = 0.1,
    calibration_weight: float = 1.0,
    belief_nll_weight: float = 1.0,
) -> LossOutput:
    """GDPO (Yao et al. ICLR 2025): belief calibration + belief NLL + DPO within the stated belief.

    loss = w_cal·KL(p* ‖ q) + w_nll·(−belief_mean_logps) + DPO(u), with KL = Σ_k p*_k (ln p*_k − ln q_k)
    and 0·ln 0 = 0. Shapes: the four pairwise log-probs (B,) are summed over `>` + answer + EOS given
    prompt + belief; `level_logps` (B, L) are full-vocabulary log-probs of the L level digits at the
    first completion position (not renormalised over the digits); `target_probs` p* (B, L);
    `belief_mean_logps` (B,) the per-token mean log-prob of the belief prefix before its closing `>`.
    Returns the DPO part's rewards. The authors' code fixes both weights to 1; we expose them.
    """
    _check_beta(beta)
    has_mass = target_probs > 0
    safe_target = torch.where(has_mass, target_probs, torch.ones_like(target_probs))
    kl_terms = target_probs * (torch.log(safe_target) - level_logps)
    calibration = torch.where(has_mass, kl_terms, torch.zeros_like(kl_terms)).sum(dim=-1)
    pair = dpo_loss(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta
    )
    losses = calibration_weight * calibration - belief_nll_weight * belief_mean_logps + pair.losses
    return LossOutput(losses, pair.chosen_rewards, pair.rejected_rewards)

