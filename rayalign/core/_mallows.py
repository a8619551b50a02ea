"""Numerics of the Mallows–Kendall pairwise link used by MallowsPO-ϕ (spec §2).

Private helper of `rayalign.core.losses`: the public entry points are `mallows_phi_loss` and
`mallows_phi_link` there. This module holds only the branch-by-branch evaluation of
`−log g_ϕ(s)`, which needs care to stay finite and differentiable for |s| up to 1e3 in float32.

With a = −ln ϕ and h(k) = k / (1 − ϕ^k):
    g_ϕ(s) = h(s+1) − h(s)      for s > 0 (and its right limit at s = 0),
    g_ϕ(s) = 1 − g_ϕ(−s)        for s < 0.
Four branches, each fed an input that is safe for it, because `torch.where` back-propagates NaN
from the branch it did not pick:
    0 ≤ s < δ      series of h(s) (h is 0/0 at s = 0; the series gives the right-hand derivative),
    s ≥ δ          closed form of 1 − g, loss = −log1p(−(1 − g)) (no cancellation as g → 1),
    −δ < s < 0     1 − g(t) with the series, t = −s,
    s ≤ −δ         −log(1 − g(t)) in log space (ϕ^t underflows at t ≈ 30 in float32 for ϕ = 0.05).
"""

import torch

# Below δ the series of h replaces the closed forms. The closed forms are accurate down to tiny s
# (expm1 keeps relative precision), so δ only has to keep them away from the exact 0/0 at s = 0;
# at δ = 1e-3 the dropped series term (a·s)^6 / (30240·a) is below 1e-15 for every allowed ϕ.
_SERIES_CUTOFF = 1e-3
# ϕ → 1 makes the 1/a terms of h(s+1) − h(s) cancel catastrophically; ϕ → 0 makes a = −ln ϕ blow up.
PHI_MIN = 1e-6
PHI_MAX = 1.0 - 1e-4


def _h_closed(k: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h(k) = k / (1 − ϕ^k) for k > 0, with 1 − ϕ^k = −expm1(−a·k)."""
    return k / -torch.expm1(-a * k)


def _h_series(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h(x) for small x ≥ 0: (1/a)·y/(1 − e^{−y}) with y = a·x, expanded to y^4 (Bernoulli numbers)."""
    y = a * x
    return (1.0 + y / 2 + y * y / 12 - y**4 / 720) / a


def _one_minus_g_closed(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """1 − g_ϕ(x) for x > 0: ϕ^x·[x(1−ϕ) − ϕ(1−ϕ^x)] / [(1−ϕ^x)(1−ϕ^{x+1})]."""
    phi = torch.exp(-a)
    one_minus_phi_x = -torch.expm1(-a * x)
    bracket = x * (1 - phi) - phi * one_minus_phi_x
    return torch.exp(-a * x) * bracket / (one_minus_phi_x * -torch.expm1(-a * (x + 1)))


def _neg_log_one_minus_g_far(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """−log(1 − g_ϕ(t)) for t > 0, in log space so that ϕ^t never appears on its own."""
    phi = torch.exp(-a)
    one_minus_phi_t = -torch.expm1(-a * t)
    bracket = t * (1 - phi) - phi * one_minus_phi_t
    return a * t - torch.log(bracket) + torch.log(one_minus_phi_t) + torch.log(-torch.expm1(-a * (t + 1)))


def neg_log_link(s: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """−log g_ϕ(s), elementwise; `s` and `phi` broadcast. ϕ is clamped to [PHI_MIN, PHI_MAX]."""
    a = -torch.log(phi.clamp(PHI_MIN, PHI_MAX))
    one = torch.ones_like(s)
    zero = torch.zeros_like(s)
    near_pos = (s >= 0) & (s < _SERIES_CUTOFF)
    far_pos = s >= _SERIES_CUTOFF
    near_neg = (s < 0) & (s > -_SERIES_CUTOFF)

    # s ≥ 0 near zero: g = h(s+1) − h(s), h(s) by its series; g ≈ 0.5..1 there, so no cancellation.
    x = torch.where(near_pos, s, zero)
    near_pos_loss = -torch.log(_h_closed(x + 1, a) - _h_series(x, a))
    # s ≥ δ: closed form of 1 − g, which is tiny for large s (g → 1 would cancel in h(s+1) − h(s)).
    x = torch.where(far_pos, s, one)
    far_pos_loss = -torch.log1p(-_one_minus_g_closed(x, a))
    # −δ < s < 0: g(s) = 1 − g(t) with t = −s small, so −log g(s) = −log(1 − h(t+1) + h(t)).
    t = torch.where(near_neg, -s, zero)
    near_neg_loss = -torch.log1p(-(_h_closed(t + 1, a) - _h_series(t, a)))
    # s ≤ −δ: log-space form, finite up to |s| = 1e3 and beyond (it grows like a·|s|).
    t = torch.where(s <= -_SERIES_CUTOFF, -s, one)
    far_neg_loss = _neg_log_one_minus_g_far(t, a)

    loss = torch.where(
        near_pos,
        near_pos_loss,
        torch.where(far_pos, far_pos_loss, torch.where(near_neg, near_neg_loss, far_neg_loss)),
    )
    # A NaN margin fails every branch test and would silently land on a finite branch: keep it NaN.
    return torch.where(torch.isnan(s), s, loss)
