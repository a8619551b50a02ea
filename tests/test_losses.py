"""Pure-math tests of the DPO family, EXO and GDPO losses: worked numbers, gradients, sanity properties.

The running pair of spec §1: policy_chosen=−10, policy_rejected=−12, ref_chosen=−11, ref_rejected=−11.5,
β=0.1, so Δ_w = 1, Δ_l = −0.5 and u = 0.1·1.5 = 0.15. Mallows losses live in test_losses_mallows.py.
"""

import math

import pytest
import torch

from rayalign.core import losses as L

F64 = torch.float64


def _t(*values, dtype=F64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def running_pair(dtype=F64):
    return _t(-10.0, dtype=dtype), _t(-12.0, dtype=dtype), _t(-11.0, dtype=dtype), _t(-11.5, dtype=dtype)


def pair_at_u(u: torch.Tensor, beta: float = 0.1):
    """Log-probs whose DPO logit is exactly u: Δ_w = u/β, everything else 0."""
    zero = torch.zeros_like(u)
    return u / beta, zero, zero, zero


def grad_wrt_u(loss_fn, u_value: float, **kwargs) -> float:
    u = torch.tensor([u_value], dtype=F64, requires_grad=True)
    out = loss_fn(*pair_at_u(u, kwargs.get("beta", 0.1)), **kwargs)
    (grad,) = torch.autograd.grad(out.losses.sum(), u)
    return grad.item()


# ---------------------------------------------------------------- DPO / cDPO


def test_dpo_worked_number():
    """u = 0.15: −logσ(0.15) = log(1 + e^{−0.15}) = log(1.860708) = 0.620957.
    Rewards: β·Δ_w = 0.1, β·Δ_l = −0.05."""
    out = L.dpo_loss(*running_pair())
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(0.620957, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(-0.05, abs=1e-12)


def test_cdpo_worked_number():
    """ε = 0.1: 0.9·0.620957 + 0.1·(−logσ(−0.15)) = 0.9·0.620957 + 0.1·0.770957 = 0.635957
    (−logσ(−u) = −logσ(u) + u)."""
    out = L.dpo_loss(*running_pair(), label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.635957, abs=1e-6)


def test_dpo_at_zero_is_log2():
    """u = 0: −(1−ε)·log ½ − ε·log ½ = log 2 for every ε."""
    for eps in (0.0, 0.1, 0.4):
        out = L.dpo_loss(*pair_at_u(torch.zeros(3, dtype=F64)), label_smoothing=eps)
        torch.testing.assert_close(out.losses, torch.full((3,), math.log(2), dtype=F64))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("u", [-3.0, -0.2, 0.0, 0.15, 2.5])
def test_dpo_gradient_wrt_u(eps, u):
    """d/du[−(1−ε)logσ(u) − εlogσ(−u)] = −(1−ε)σ(−u) + εσ(u) = σ(u) − (1−ε)."""
    expected = 1 / (1 + math.exp(-u)) - (1 - eps)
    assert grad_wrt_u(L.dpo_loss, u, label_smoothing=eps) == pytest.approx(expected, abs=1e-12)


def test_spa_smoothed_pair_gradients():
    """Spec §5: at u = 0.15, σ(u) = 0.537430; clean dL/du = σ(u) − 1 = −0.462570, smoothed (ε=0.1)
    σ(u) − 0.9 = −0.362570."""
    assert grad_wrt_u(L.dpo_loss, 0.15) == pytest.approx(-0.462570, abs=1e-6)
    assert grad_wrt_u(L.dpo_loss, 0.15, label_smoothing=0.1) == pytest.approx(-0.362570, abs=1e-6)


def test_dpo_swap_maps_u_to_minus_u():
    """Swapping chosen and rejected negates u: loss_swapped(ε) = −(1−ε)logσ(−u) − εlogσ(u)."""
    pc, pr, rc, rr = (torch.randn(6, dtype=F64) for _ in range(4))
    eps = 0.2
    u = 0.1 * ((pc - rc) - (pr - rr))
    swapped = L.dpo_loss(pr, pc, rr, rc, label_smoothing=eps).losses
    expected = -(1 - eps) * torch.nn.functional.logsigmoid(-u) - eps * torch.nn.functional.logsigmoid(u)
    torch.testing.assert_close(swapped, expected)


def test_cdpo_minimum_at_logit():
    """ε > 0: the gradient σ(u) − (1−ε) vanishes at u* = logit(1−ε) = log((1−ε)/ε), and the loss is
    convex, so u* is the minimum (for ε = 0.1, u* = log 9 = 2.197225)."""
    eps = 0.1
    u_star = math.log((1 - eps) / eps)
    assert grad_wrt_u(L.dpo_loss, u_star, label_smoothing=eps) == pytest.approx(0.0, abs=1e-12)
    us = torch.tensor([u_star - 0.5, u_star, u_star + 0.5], dtype=F64)
    losses = L.dpo_loss(*pair_at_u(us), label_smoothing=eps).losses
    assert losses[1] < losses[0] and losses[1] < losses[2]


def test_dpo_per_example_label_smoothing_tensor():
    """A (B,) ε gives row i the loss of the float ε_i (SPA smooths only flagged pairs)."""
    pc, pr, rc, rr = (torch.randn(4, dtype=F64) for _ in range(4))
    eps = torch.tensor([0.0, 0.1, 0.0, 0.25], dtype=F64)
    batched = L.dpo_loss(pc, pr, rc, rr, label_smoothing=eps).losses
    for i in range(4):
        row = L.dpo_loss(
            pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], label_smoothing=eps[i].item()
        )
        torch.testing.assert_close(batched[i : i + 1], row.losses)


def test_dpo_rejects_bad_hyperparameters():
    with pytest.raises(ValueError):
        L.dpo_loss(*running_pair(), label_smoothing=1.5)
    with pytest.raises(ValueError):
        L.dpo_loss(*running_pair(), beta=0.0)


# ---------------------------------------------------------------- IPO / hinge


def test_ipo_worked_number():
    """(Δ_w − Δ_l − 1/(2β))² = (1.5 − 5)² = 12.25; the running pair read as per-token means."""
    assert L.ipo_loss(*running_pair()).losses.item() == pytest.approx(12.25, abs=1e-12)


def test_ipo_minimum_at_half_over_beta():
    """The IPO loss is 0 exactly when Δ_w − Δ_l = 1/(2β) (= 5 for β = 0.1)."""
    u = torch.tensor([0.5], dtype=F64)  # β·5
    assert L.ipo_loss(*pair_at_u(u)).losses.item() == pytest.approx(0.0, abs=1e-24)


def test_hinge_worked_numbers():
    """relu(1 − u): 1 − 0.15 = 0.85 for the running pair; 0 once u ≥ 1."""
    assert L.hinge_loss(*running_pair()).losses.item() == pytest.approx(0.85, abs=1e-12)
    out = L.hinge_loss(*pair_at_u(torch.tensor([1.0, 3.0, -2.0], dtype=F64)))
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 0.0, 3.0], dtype=F64))


# ---------------------------------------------------------------- EXO-pref


def test_exo_pref_worked_number():
    """ε = 1e-3, u = 0.15: σ(u) = 0.537430, σ(−u) = 0.462570;
    0.537430·(log 0.537430 − log 0.999) + 0.462570·(log 0.462570 − log 0.001)
    = 0.537430·(−0.620957 + 0.001001) + 0.462570·(−0.770957 + 6.907755) = 2.505517.
    dL/du = σ(u)σ(−u)·(u − log(0.999/0.001)) = 0.248599·(0.15 − 6.906755) = −1.679723."""
    out = L.exo_pref_loss(*running_pair(), label_smoothing=1e-3)
    assert out.losses.item() == pytest.approx(2.505517, abs=1e-6)
    assert grad_wrt_u(L.exo_pref_loss, 0.15, label_smoothing=1e-3) == pytest.approx(-1.679723, abs=1e-6)


@pytest.mark.parametrize("u", [-4.0, -0.3, 0.0, 0.15, 3.0, 9.0])
def test_exo_pref_gradient_formula(u):
    """dL/du = σ(u)σ(−u)·(u − log((1−ε)/ε))."""
    eps = 1e-3
    sig = 1 / (1 + math.exp(-u))
    expected = sig * (1 - sig) * (u - math.log((1 - eps) / eps))
    assert grad_wrt_u(L.exo_pref_loss, u, label_smoothing=eps) == pytest.approx(expected, abs=1e-12)


def test_exo_pref_optimum():
    """u* = log((1−ε)/ε) = 6.906755 for ε = 1e-3: zero gradient, and the loss there is 0 (p_θ = target)."""
    u_star = math.log(0.999 / 0.001)
    assert u_star == pytest.approx(6.9068, abs=1e-4)
    assert grad_wrt_u(L.exo_pref_loss, u_star) == pytest.approx(0.0, abs=1e-12)
    us = torch.tensor([u_star - 1, u_star, u_star + 1], dtype=F64)
    losses = L.exo_pref_loss(*pair_at_u(us)).losses
    assert losses[1].item() == pytest.approx(0.0, abs=1e-12)
    assert losses[0] > 0 and losses[2] > 0


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.1])
def test_exo_pref_rejects_eps_outside_open_interval(eps):
    with pytest.raises(ValueError):
        L.exo_pref_loss(*running_pair(), label_smoothing=eps)
    with pytest.raises(ValueError):
        L.exo_pref_group_loss(
            torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), label_smoothing=eps
        )


def test_exo_pref_equals_group_loss_with_k2():
    """With K = 2 the group target [1−ε, ε/(K−1)] is the pairwise target; chosen may sit in either column."""
    pc, pr, rc, rr = (torch.randn(5, dtype=F64) * 3 for _ in range(4))
    pair = L.exo_pref_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.01)
    first = L.exo_pref_group_loss(
        torch.stack([pc, pr], 1),
        torch.stack([rc, rr], 1),
        torch.zeros(5, dtype=torch.long),
        beta_pi=0.2,
        label_smoothing=0.01,
    )
    second = L.exo_pref_group_loss(
        torch.stack([pr, pc], 1),
        torch.stack([rr, rc], 1),
        torch.ones(5, dtype=torch.long),
        beta_pi=0.2,
        label_smoothing=0.01,
    )
    torch.testing.assert_close(first.losses, pair.losses)
    torch.testing.assert_close(second.losses, pair.losses)
    torch.testing.assert_close(first.rewards[:, 0], pair.chosen_rewards)


def test_exo_pref_group_k3_by_hand():
    """K = 3, β_π = 1, Δ = [1, 0, 0], chosen 0, ε = 0.1: p_θ = [e, 1, 1]/(e+2)
    = [0.576117, 0.211942, 0.211942], target [1−ε, ε/2, ε/2] = [0.9, 0.05, 0.05];
    KL = 0.576117·ln(0.576117/0.9) + 2·0.211942·ln(0.211942/0.05) = −0.256997 + 0.612209 = 0.355212."""
    q = [math.e / (math.e + 2), 1 / (math.e + 2), 1 / (math.e + 2)]
    target = [0.9, 0.05, 0.05]
    expected = sum(qi * math.log(qi / ti) for qi, ti in zip(q, target))
    out = L.exo_pref_group_loss(
        _t(1.0, 0.0, 0.0)[None],
        torch.zeros(1, 3, dtype=F64),
        torch.tensor([0]),
        beta_pi=1.0,
        label_smoothing=0.1,
    )
    assert out.losses.item() == pytest.approx(expected, abs=1e-12)
    assert out.losses.item() == pytest.approx(0.355212, abs=1e-6)


# ---------------------------------------------------------------- EXO-rw / DPO-rw

K3_REWARDS = (1.0, 0.0, -0.5)
K3_DELTAS = (0.5, -0.2, 0.1)


def test_exo_rw_worked_numbers():
    """r = [1, 0, −0.5], β_r = 1, β_π = 0.1, Δ = [0.5, −0.2, 0.1]: f = [0.05, −0.02, 0.01],
    p_θ = softmax(f) = [0.345640, 0.322273, 0.332087], p_r = softmax(r) = [0.628532, 0.231224, 0.140244],
    EXO-rw = Σ p_θ log(p_θ/p_r) = 0.186572, and dL/df_i = p_θ(i)·(log p_θ(i) − log p_r(i) − L)
    = [−0.271176, 0.046871, 0.224305]."""
    f = _t(*K3_DELTAS)[None].mul(0.1).requires_grad_(True)
    out = L.exo_rw_loss(f / 0.1, torch.zeros_like(f), _t(*K3_REWARDS)[None], beta_pi=0.1, beta_r=1.0)
    assert out.losses.item() == pytest.approx(0.186572, abs=1e-6)
    torch.testing.assert_close(
        torch.softmax(out.rewards, -1), _t(0.345640, 0.322273, 0.332087)[None], atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        torch.softmax(_t(*K3_REWARDS), -1), _t(0.628532, 0.231224, 0.140244), atol=1e-6, rtol=0
    )
    (grad,) = torch.autograd.grad(out.losses.sum(), f)
    torch.testing.assert_close(grad, _t(-0.271176, 0.046871, 0.224305)[None], atol=1e-6, rtol=0)


def test_dpo_rw_worked_number():
    """DPO-rw = −Σ p_r log p_θ = −(0.628532·log 0.345640 + 0.231224·log 0.322273 + 0.140244·log 0.332087)
    = 1.084153."""
    out = L.dpo_rw_loss(
        _t(*K3_DELTAS)[None], torch.zeros(1, 3, dtype=F64), _t(*K3_REWARDS)[None], beta_pi=0.1, beta_r=1.0
    )
    assert out.losses.item() == pytest.approx(1.084153, abs=1e-6)


def test_exo_rw_zero_iff_condition():
    """EXO-rw is 0 iff β_π(Δ_i − Δ_j) = (r_i − r_j)/β_r: take Δ = r/(β_r β_π) + c (any per-prompt c)."""
    beta_pi, beta_r = 0.1, 0.5
    torch.manual_seed(0)  # unseeded, some draws put so little mass on sample 0 that the perturbation is < 1e-6
    rewards = torch.randn(4, 5, dtype=F64)
    ref = torch.randn(4, 5, dtype=F64)
    shift = torch.randn(4, 1, dtype=F64)
    policy = ref + rewards / (beta_r * beta_pi) + shift
    out = L.exo_rw_loss(policy, ref, rewards, beta_pi=beta_pi, beta_r=beta_r)
    torch.testing.assert_close(out.losses, torch.zeros(4, dtype=F64), atol=1e-12, rtol=0)
    perturbed = policy.clone()
    perturbed[:, 0] += 0.5
    assert (L.exo_rw_loss(perturbed, ref, rewards, beta_pi=beta_pi, beta_r=beta_r).losses > 1e-6).all()


def test_dpo_rw_k2_one_hot_is_dpo():
    """K = 2 with p_r = [1, 0]: −log softmax(β_π Δ)_0 = −logσ(β_π(Δ_0 − Δ_1)), DPO with β = β_π."""
    pc, pr, rc, rr = (torch.randn(6, dtype=F64) * 4 for _ in range(4))
    rewards = torch.tensor([[0.0, -math.inf]], dtype=F64).expand(6, 2)
    out = L.dpo_rw_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), rewards, beta_pi=0.3, beta_r=1.0)
    torch.testing.assert_close(out.losses, L.dpo_loss(pc, pr, rc, rr, beta=0.3).losses)


def test_exo_is_not_dpo_as_eps_goes_to_zero():
    """Reverse vs forward KL: at the running pair EXO-pref with ε = 1e-8 is far from DPO (it grows like
    σ(−u)·log(1/ε))."""
    exo = L.exo_pref_loss(*running_pair(), label_smoothing=1e-8).losses.item()
    assert abs(exo - 0.620957) > 1.0


# ---------------------------------------------------------------- GDPO

P_STAR = (0.02, 0.10, 0.30, 0.08, 0.40, 0.10)
Q_LEVELS = (0.01, 0.15, 0.20, 0.10, 0.30, 0.14)


def test_gdpo_worked_number():
    """KL(p*‖q) = Σ p*_k ln(p*_k/q_k) = 0.02 ln 2 + 0.1 ln(2/3) + 0.3 ln 1.5 + 0.08 ln 0.8 + 0.4 ln(4/3)
    + 0.1 ln(5/7) = 0.158530; plus DPO 0.620957 plus the belief NLL 0.43: 1.209487."""
    kwargs = {
        "level_logps": torch.log(_t(*Q_LEVELS))[None],
        "target_probs": _t(*P_STAR)[None],
        "belief_mean_logps": _t(-0.43),
    }
    out = L.gdpo_loss(*running_pair(), **kwargs)
    assert out.losses.item() == pytest.approx(1.209487, abs=1e-6)
    kl_only = (
        L.gdpo_loss(*running_pair(), **kwargs, belief_nll_weight=0.0).losses
        - L.dpo_loss(*running_pair()).losses
    )
    assert kl_only.item() == pytest.approx(0.158530, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-12)


def test_gdpo_zero_target_levels_contribute_nothing():
    """0·ln 0 = 0: a level with p* = 0 adds nothing, even where q is 0 (log q = −inf), and stays NaN-free."""
    level_logps = torch.log(_t(0.5, 0.0, 0.3))[None].requires_grad_(True)
    target = _t(0.6, 0.0, 0.4)[None]
    out = L.gdpo_loss(
        *running_pair(), level_logps=level_logps, target_probs=target, belief_mean_logps=_t(0.0)
    )
    expected = 0.6 * math.log(0.6 / 0.5) + 0.4 * math.log(0.4 / 0.3) + 0.620957
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(out.losses.sum(), level_logps)
    torch.testing.assert_close(grad, _t(-0.6, 0.0, -0.4)[None])
