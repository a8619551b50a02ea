"""MallowsPO-θ and MallowsPO-ϕ (spec §2): worked numbers, the exact Mallows–Kendall link, numerics.

The independent reference for the ϕ link is brute force: enumerate every permutation of a small
ranking, weight it by ϕ^{Kendall distance to the central ranking}, and count how often one item
precedes another.
"""

import itertools
import math

import pytest
import torch

from rayalign.core import losses as L

F64 = torch.float64


def _t(*values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def running_pair(dtype=F64):
    return _t(-10.0, dtype=dtype), _t(-12.0, dtype=dtype), _t(-11.0, dtype=dtype), _t(-11.5, dtype=dtype)


def pair_at_u(u, beta=0.1):
    zero = torch.zeros_like(u)
    return u / beta, zero, zero, zero


def phi_loss_at(s, phi=0.05, dtype=F64):
    """MallowsPO-ϕ loss at margin(s) s (β = 0.1)."""
    return L.mallows_phi_loss(*pair_at_u(torch.as_tensor(s, dtype=dtype)), phi=phi).losses


# ---------------------------------------------------------------- θ variant


def test_neg_log_dispersion_worked_number():
    """Entropies 0.40 and 0.60 nats/token, V = 50257: H̄ = 0.5 / ln 50257 = 0.5 / 10.824905 = 0.046190,
    k = −0.29·ln 0.046190 = 0.29·3.074997 = 0.891749."""
    k = L.mallows_neg_log_dispersion(_t(0.40), _t(0.60), vocab_size=50257)
    assert (0.5 / math.log(50257)) == pytest.approx(0.046190, abs=1e-6)
    assert k.item() == pytest.approx(0.891749, abs=1e-6)
    assert not k.requires_grad


def test_neg_log_dispersion_clamps():
    """H̄ is clamped to [1e-6, 1): zero entropy gives the finite k = −c·ln 1e-6, and entropy ≥ ln V gives
    k ≈ 0 but never negative."""
    k = L.mallows_neg_log_dispersion(_t(0.0, 20.0), _t(0.0, 20.0), vocab_size=64, scale=0.29)
    assert k[0].item() == pytest.approx(-0.29 * math.log(1e-6), rel=1e-12)
    assert 0.0 <= k[1].item() < 1e-5


def test_mallows_theta_worked_number():
    """k·u = 0.891749·0.15 = 0.133762; −logσ(0.133762) = 0.628501. Rewards stay the unscaled β·Δ."""
    k = L.mallows_neg_log_dispersion(_t(0.40), _t(0.60), vocab_size=50257)
    out = L.mallows_theta_loss(*running_pair(), neg_log_dispersion=k)
    assert out.losses.item() == pytest.approx(0.628501, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mallows_theta_reduces_to_dpo(eps):
    """k ≡ 1 is DPO; k ≡ c is DPO with β' = c·β (the logit c·β·(Δ_w − Δ_l)). Same for cDPO."""
    pc, pr, rc, rr = (torch.randn(6, dtype=F64) * 3 for _ in range(4))
    ones = torch.ones(6, dtype=F64)
    torch.testing.assert_close(
        L.mallows_theta_loss(pc, pr, rc, rr, neg_log_dispersion=ones, label_smoothing=eps).losses,
        L.dpo_loss(pc, pr, rc, rr, label_smoothing=eps).losses,
    )
    torch.testing.assert_close(
        L.mallows_theta_loss(
            pc, pr, rc, rr, beta=0.1, neg_log_dispersion=2.5 * ones, label_smoothing=eps
        ).losses,
        L.dpo_loss(pc, pr, rc, rr, beta=0.25, label_smoothing=eps).losses,
    )


def test_mallows_theta_gradcheck():
    g = torch.Generator().manual_seed(3)
    pc, pr = (torch.randn(5, dtype=F64, generator=g).requires_grad_(True) for _ in range(2))
    rc, rr = (torch.randn(5, dtype=F64, generator=g) for _ in range(2))
    k = torch.rand(5, dtype=F64, generator=g) * 2
    assert torch.autograd.gradcheck(
        lambda a, b: L.mallows_theta_loss(a, b, rc, rr, neg_log_dispersion=k, label_smoothing=0.1).losses,
        (pc, pr),
    )


# ---------------------------------------------------------------- ϕ variant: worked numbers


def test_mallows_phi_worked_numbers():
    """ϕ = 0.05, a = −ln ϕ = 2.995732, h(k) = k/(1−ϕ^k).
    s = 0.15: h(1.15) = 1.15/(1 − 0.05^1.15) = 1.187896, h(0.15) = 0.15/(1 − 0.05^0.15) = 0.414406,
      g = 0.773490, loss = −ln g = 0.256843.
    s = −0.15: loss = −ln(1 − 0.773490) = 1.484965.
    s = 0: g(0) = 1/(1−ϕ) + 1/ln ϕ = 1.052632 − 0.333808 = 0.718823, loss 0.330140 (not ln 2)."""
    assert L.mallows_phi_loss(*running_pair(), phi=0.05).losses.item() == pytest.approx(0.256843, abs=1e-6)
    swapped = L.mallows_phi_loss(_t(-12.0), _t(-10.0), _t(-11.5), _t(-11.0), phi=0.05)
    assert swapped.losses.item() == pytest.approx(1.484965, abs=1e-6)
    link = L.mallows_phi_link(_t(0.15, 0.0), phi=0.05)
    torch.testing.assert_close(link, _t(0.773490, 0.718823), atol=1e-6, rtol=0)
    assert phi_loss_at([0.0]).item() == pytest.approx(0.330140, abs=1e-6)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_mallows_phi_far_negative_in_log_space(dtype):
    """t = −s = 1000, ϕ = 0.05: loss = a·t − ln(t(1−ϕ) − ϕ(1−ϕ^t)) + ln(1−ϕ^t) + ln(1−ϕ^{t+1})
    = 2995.732 − ln(949.95) + 0 + 0 = 2995.732 − 6.856 = 2988.876 (ϕ^t underflows long before)."""
    loss = phi_loss_at([-1000.0], dtype=dtype)
    assert loss.item() == pytest.approx(2988.876, abs=1e-3 if dtype == F64 else 2e-2)


def test_mallows_phi_right_derivative_at_zero():
    """At s = 0 the series h(s) ≈ 1/a + s/2 + a s²/12 gives the right-hand derivative:
    g'(0+) = h'(1) − h'(0) = [1/(1−ϕ) − aϕ/(1−ϕ)²] − ½ = 1.052632 − 0.165969 − 0.5 = 0.386663,
    dL/ds = −g'(0)/g(0) = −0.386663/0.718823 = −0.537911. Also checked against a one-sided difference."""
    s = torch.zeros(1, dtype=F64, requires_grad=True)
    loss = L.mallows_phi_loss(
        s / 0.1, torch.zeros_like(s), torch.zeros_like(s), torch.zeros_like(s), phi=0.05
    ).losses
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert grad.item() == pytest.approx(-0.537911, abs=1e-6)
    h = 1e-7
    one_sided = (phi_loss_at([h]) - phi_loss_at([0.0])).item() / h
    assert one_sided == pytest.approx(-0.537911, abs=1e-5)


# ---------------------------------------------------------------- ϕ variant: the link is Mallows–Kendall


@pytest.mark.parametrize("phi", [0.05, 0.3, 0.7, 0.95])
def test_link_at_one_is_one_over_one_plus_phi(phi):
    """g(1) = h(2) − h(1) = 2/(1−ϕ²) − 1/(1−ϕ) = (2 − (1+ϕ))/(1−ϕ²) = 1/(1+ϕ)."""
    assert L.mallows_phi_link(_t(1.0), phi=phi).item() == pytest.approx(1 / (1 + phi), abs=1e-12)


def _kendall_distance(perm):
    return sum(1 for i, j in itertools.combinations(range(len(perm)), 2) if perm[i] > perm[j])


def _mallows_pairwise(n_items, phi):
    """Brute force: P(item i is ranked before item j) under P(π) ∝ ϕ^{d_K(π, identity)}."""
    perms = list(itertools.permutations(range(n_items)))
    weights = [phi ** _kendall_distance(p) for p in perms]
    total = sum(weights)
    prob = {}
    for i, j in itertools.permutations(range(n_items), 2):
        prob[(i, j)] = sum(w for p, w in zip(perms, weights) if p.index(i) < p.index(j)) / total
    return prob


@pytest.mark.parametrize("phi", [0.05, 0.4, 0.8])
def test_link_equals_exact_mallows_kendall_probability(phi):
    """For every pair (i, j) of a 6-item central ranking 0 ≻ 1 ≻ … ≻ 5, the exact probability that i is
    ranked before j equals g_ϕ(j − i): positive for the higher item, 1 − g_ϕ(|Δ|) for the lower one.
    (The pairwise marginal depends only on the rank gap, not on n or the position.)"""
    prob = _mallows_pairwise(6, phi)
    pairs = list(prob)
    gaps = _t(*[float(j - i) for i, j in pairs])
    expected = _t(*[prob[p] for p in pairs])
    torch.testing.assert_close(L.mallows_phi_link(gaps, phi=phi), expected, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- ϕ variant: numerics


@pytest.mark.parametrize("phi", [0.05, 0.5, 0.9])
def test_branches_join_continuously(phi):
    """Values just inside and outside the series cutoff δ = 1e-3 agree (series vs closed forms)."""
    from rayalign.core._mallows import _SERIES_CUTOFF as cut

    for sign in (1.0, -1.0):
        inside = phi_loss_at([sign * (cut - 1e-12)], phi=phi)
        outside = phi_loss_at([sign * cut], phi=phi)
        torch.testing.assert_close(inside, outside, atol=1e-10, rtol=0)


@pytest.mark.parametrize("phi", [0.05, 0.5, 0.9])
def test_float32_matches_float64(phi):
    s = torch.linspace(-60, 60, 241, dtype=F64)
    s = torch.cat([s, _t(0.0, 1e-4, -1e-4, 2e-3, -2e-3)])
    ref = phi_loss_at(s, phi=phi)
    low = phi_loss_at(s.float(), phi=phi, dtype=torch.float32).double()
    torch.testing.assert_close(low, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("phi", [0.05, 0.6])
@pytest.mark.parametrize("center", [-30.0, -2.0, -0.4, 0.4, 2.0, 12.0])
def test_mallows_phi_gradcheck_away_from_zero(phi, center):
    """Both branches away from the jump at 0 (closed forms for |s| ≥ δ)."""
    g = torch.Generator().manual_seed(4)
    u = center + 0.1 * torch.rand(4, dtype=F64, generator=g)
    pc = (u / 0.1).requires_grad_(True)
    pr = torch.zeros(4, dtype=F64, requires_grad=True)
    zero = torch.zeros(4, dtype=F64)
    assert torch.autograd.gradcheck(
        lambda a, b: L.mallows_phi_loss(a, b, zero, zero, phi=phi).losses, (pc, pr)
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_mallows_phi_gradcheck_series_region(sign):
    """0 < |s| < δ uses the series of h; gradcheck's steps of 1e-6 in log-probs (1e-7 in s) stay on
    one side of 0."""
    u = sign * _t(2e-4, 5e-4, 8e-4)
    pc = (u / 0.1).requires_grad_(True)
    zero = torch.zeros(3, dtype=F64)
    assert torch.autograd.gradcheck(lambda a: L.mallows_phi_loss(a, zero, zero, zero, phi=0.05).losses, (pc,))


def test_mallows_phi_finite_float32_extremes():
    """|s| up to 1e3 in float32 for small, mid and clamped ϕ, values and gradients finite; the positive
    tail saturates like 1 − g ≈ s(1−ϕ)ϕ^s."""
    s = torch.tensor([-1e3, -100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 1e3], requires_grad=True)
    zero = torch.zeros_like(s)
    for phi in (1e-9, 0.05, 0.5, 1.0):
        loss = L.mallows_phi_loss(s / 0.1, zero, zero, zero, phi=torch.tensor(phi)).losses
        (grad,) = torch.autograd.grad(loss.sum(), s)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), phi
    # −log g ≈ 1 − g = ϕ^s·[s(1−ϕ) − ϕ(1−ϕ^s)]/[(1−ϕ^s)(1−ϕ^{s+1})] ≈ ϕ^s·(s(1−ϕ) − ϕ) ≈ s(1−ϕ)ϕ^s.
    tail = phi_loss_at([8.0]).item()
    assert tail == pytest.approx(0.05**8 * (8 * 0.95 - 0.05), rel=1e-8)
    assert tail == pytest.approx(8 * 0.95 * 0.05**8, rel=1e-2)


def test_mallows_phi_near_one_tends_to_log2_at_zero():
    """ϕ → 1 (clamped at 1 − 1e-4): g(0+) = 1/(1−ϕ) − 1/a → ½, so the loss at s = 0 → ln 2."""
    loss = phi_loss_at([0.0], phi=torch.tensor([1.0], dtype=F64))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4)


def test_mallows_phi_per_example_tensor():
    """A (B,) ϕ gives row i the loss of the float ϕ_i."""
    u = _t(-1.0, 0.0, 0.3, 5.0)
    phi = _t(0.05, 0.2, 0.7, 0.9)
    batched = phi_loss_at(u, phi=phi)
    for i in range(4):
        assert batched[i].item() == pytest.approx(
            phi_loss_at(u[i : i + 1], phi=phi[i].item()).item(), abs=1e-14
        )


@pytest.mark.parametrize("phi", [0.0, 1.0, 1.5])
def test_mallows_phi_rejects_float_phi_outside_open_interval(phi):
    with pytest.raises(ValueError):
        L.mallows_phi_loss(*running_pair(), phi=phi)


def test_mallows_phi_nan_margin_stays_nan():
    assert torch.isnan(phi_loss_at([float("nan")])).all()
