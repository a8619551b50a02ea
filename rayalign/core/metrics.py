"""Evaluation metrics for preference alignment: pure functions on tensors.

What is here: implicit-reward accuracy and margins for pairs (as TRL logs them), win rate between two
score vectors, the k1 Monte-Carlo estimate of the sequence-level KL(policy ‖ reference), and distances
between discrete distributions (KL divergence, the Jensen–Shannon distance GDPO reports as its
"alignment gap", ALGORITHMS.md §3).

What is not: no reduction across workers, no logging, no model calls and no sampling. Every function
takes tensors the caller already has and returns tensors on the same device (no `.item()`, so no host
sync). Nothing here renormalises a distribution behind the caller's back: where a metric is defined on
probability vectors, pass probability vectors (`renormalize` is provided for the caller to use).

Torch and the standard library only.
"""

import math

import torch

__all__ = [
    "JS_DISTANCE_MAX",
    "js_distance",
    "kl_divergence",
    "renormalize",
    "reward_accuracy",
    "reward_margins",
    "sequence_kl_estimate",
    "win_rate",
]

# The Jensen–Shannon divergence with natural logs is at most ln 2 (disjoint supports); its square root,
# the JS distance, is therefore at most sqrt(ln 2) ≈ 0.832555.
JS_DISTANCE_MAX = math.sqrt(math.log(2.0))


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair implicit-reward accuracy: 1.0 where chosen scores strictly higher, else 0.0.

    `chosen_rewards, rejected_rewards`: (B,) -> (B,) float. A tie counts as wrong (0.0), as TRL's
    `(chosen_rewards > rejected_rewards).float()` does, so an untrained policy (all rewards 0) scores 0,
    not 0.5. Take the mean for the batch accuracy.
    """
    return (chosen_rewards > rejected_rewards).to(_float_dtype(chosen_rewards))


def reward_margins(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair implicit-reward margin `chosen − rejected`: (B,) -> (B,)."""
    return chosen_rewards - rejected_rewards


def win_rate(scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
    """Fraction of paired items where a beats b, ties counting one half: (N,), (N,) -> scalar tensor.

    `mean(1[a > b] + 0.5·1[a == b])`. Symmetric in the sense win_rate(a, b) + win_rate(b, a) = 1.
    """
    dtype = _float_dtype(scores_a)
    wins = (scores_a > scores_b).to(dtype) + 0.5 * (scores_a == scores_b).to(dtype)
    return wins.mean()


def sequence_kl_estimate(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Monte-Carlo estimate of the sequence-level KL(π_θ ‖ π_ref): (B,), (B,) -> scalar tensor.

    `mean_i [logp_θ(y_i|x_i) − logp_ref(y_i|x_i)]`, the standard "k1" estimator. It is unbiased **only if
    the y_i were sampled from the policy π_θ** (temperature 1, no top-k/top-p): on dataset completions
    (e.g. the chosen responses of a preference set) it is not a KL and can be negative. Individual terms
    are often negative even on-policy; only the mean estimates the KL. Log-probs are summed over the
    completion tokens (ALGORITHMS.md §0).
    """
    return (policy_logps - ref_logps).mean()


def renormalize(probs: torch.Tensor) -> torch.Tensor:
    """Rescale non-negative weights to sum to 1 over the last dim: (..., L) -> (..., L).

    For example the full-vocabulary probabilities of the L level digits (which sum to less than 1) before
    `js_distance`. An all-zero row gives NaN (there is no distribution to compare), which is left visible.
    """
    return probs / probs.sum(dim=-1, keepdim=True)


def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_k p_k (ln p_k − ln q_k) over the last dim, in nats: (..., L) -> (...).

    Uses 0·ln 0 = 0 (terms with p_k = 0 contribute nothing, whatever q_k is); p_k > 0 with q_k = 0 gives
    +inf, which is the true value. `q` is used as given — not renormalised — which is what GDPO's
    calibration term wants (ALGORITHMS.md §3, `q` are full-vocabulary probabilities).
    """
    # xlogy(0, ·) is exactly 0, which is the 0·ln 0 convention without masking.
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=-1)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon distance between distributions over the last dim: (L,) or (B, L) -> () or (B,).

    `JS(p, q) = sqrt( ½·KL(p ‖ m) + ½·KL(q ‖ m) )` with `m = (p + q)/2` and natural logs, so the range is
    [0, sqrt(ln 2)] (`JS_DISTANCE_MAX`): 0 iff p = q, sqrt(ln 2) for disjoint supports. Symmetric, and a
    metric (it satisfies the triangle inequality). Zeros are handled with 0·ln 0 = 0, and m_k > 0 wherever
    p_k > 0 or q_k > 0, so the result is always finite.

    Both inputs must already be probability vectors: this function does **not** renormalise (call
    `renormalize` first, e.g. on full-vocabulary digit probabilities). Any leading dims broadcast.

    This is an evaluation metric: its gradient is infinite at p = q (sqrt at 0), so do not train on it.
    """
    m = 0.5 * (p + q)
    divergence = 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)
    # Rounding can leave the divergence a hair below 0 (identical inputs) or above ln 2 (disjoint ones).
    return divergence.clamp(min=0.0, max=math.log(2.0)).sqrt()


def _float_dtype(t: torch.Tensor) -> torch.dtype:
    """The tensor's dtype if it is floating point, else the default float dtype (for int/bool scores)."""
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
