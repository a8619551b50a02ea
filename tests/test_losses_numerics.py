"""Numerics of every loss: float64 gradcheck, finiteness at ±1e4 log-probs and ±1e3 β·margins in float32,
per-example shapes and the config-name mapping. Worked numbers are in test_losses.py and
test_losses_mallows.py.
"""

import pytest
import torch

from rayalign.core import losses as L
from rayalign.loss_registry import PAIR_LOSSES
from rayalign.objective import loss_function

F64 = torch.float64


def pair_at_u(u: torch.Tensor, beta: float = 0.1):
    """Log-probs whose DPO logit is exactly u: Δ_w = u/β, everything else 0."""
    zero = torch.zeros_like(u)
    return u / beta, zero, zero, zero


# ---------------------------------------------------------------- gradcheck (float64)


def _inputs(batch=5, scale=3.0):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, dtype=F64, generator=g) * scale).requires_grad_(True) for _ in range(2)] + [
        torch.randn(batch, dtype=F64, generator=g) * scale for _ in range(2)
    ]


@pytest.mark.parametrize(
    "loss_fn,kwargs",
    [
        (L.dpo_loss, {}),
        (L.dpo_loss, {"label_smoothing": 0.1}),
        (L.dpo_loss, {"label_smoothing": torch.tensor([0.0, 0.1, 0.2, 0.0, 0.05], dtype=F64)}),
        (L.ipo_loss, {}),
        (L.hinge_loss, {"beta": 0.01}),  # β·margins stay well below the kink at u = 1
        (L.exo_pref_loss, {}),
        (L.exo_pref_loss, {"beta": 0.5, "label_smoothing": 0.2}),
    ],
)
def test_pairwise_gradcheck(loss_fn, kwargs):
    pc, pr, rc, rr = _inputs()
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b, rc, rr, **kwargs).losses, (pc, pr))


@pytest.mark.parametrize("loss_fn", [L.exo_rw_loss, L.dpo_rw_loss])
def test_group_gradcheck(loss_fn):
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(3, 4, dtype=F64, generator=g).requires_grad_(True)
    ref, rewards = torch.randn(3, 4, dtype=F64, generator=g), torch.randn(3, 4, dtype=F64, generator=g)
    assert torch.autograd.gradcheck(
        lambda p: loss_fn(p, ref, rewards, beta_pi=0.5, beta_r=0.7).losses, (policy,)
    )


def test_exo_pref_group_gradcheck():
    g = torch.Generator().manual_seed(2)
    policy = torch.randn(3, 4, dtype=F64, generator=g).requires_grad_(True)
    ref = torch.randn(3, 4, dtype=F64, generator=g)
    chosen = torch.tensor([0, 3, 1])
    assert torch.autograd.gradcheck(
        lambda p: L.exo_pref_group_loss(p, ref, chosen, beta_pi=0.5, label_smoothing=0.01).losses, (policy,)
    )


def test_gdpo_gradcheck():
    """Gradients wrt the policy log-probs, the level log-probs and the belief mean log-prob."""
    pc, pr, rc, rr = _inputs(batch=3)
    level_logps = torch.log_softmax(torch.randn(3, 6, dtype=F64), -1).requires_grad_(True)
    target = torch.softmax(torch.randn(3, 6, dtype=F64), -1)
    target[0, 2] = 0.0
    belief = torch.randn(3, dtype=F64).requires_grad_(True)

    def fn(a, b, levels, bel):
        return L.gdpo_loss(
            a, b, rc, rr, level_logps=levels, target_probs=target, belief_mean_logps=bel
        ).losses

    assert torch.autograd.gradcheck(fn, (pc, pr, level_logps, belief))


# ---------------------------------------------------------------- finiteness, shapes, mapping

EXTREMES = [-1e4, 0.0, 1e4]


def _extreme_grid(dtype=torch.float32):
    """All 81 combinations of ±1e4 / 0 for the four log-probs: |Δ_w − Δ_l| up to 4e4, β·margins up to ±4e3."""
    combos = torch.cartesian_prod(*[torch.tensor(EXTREMES, dtype=dtype)] * 4)
    return [combos[:, i].clone() for i in range(4)]


def _pairwise_kwargs(name, batch, dtype):
    if name == "mallows_theta":
        return {"neg_log_dispersion": torch.full((batch,), 2.0, dtype=dtype)}
    if name == "mallows_phi":
        return {"phi": 0.05}
    if name == "gdpo":
        levels = torch.full((batch, 6), -1e4, dtype=dtype)
        levels[:, 0] = 0.0
        return {
            "level_logps": levels.requires_grad_(True),
            "target_probs": torch.full((batch, 6), 1 / 6, dtype=dtype),
            "belief_mean_logps": torch.full((batch,), -1e4, dtype=dtype, requires_grad=True),
        }
    return {}


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pairwise_losses_finite_at_extremes_float32(name):
    pc, pr, rc, rr = _extreme_grid()
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    kwargs = _pairwise_kwargs(name, pc.shape[0], torch.float32)
    out = loss_function(name)(pc, pr, rc, rr, **kwargs)
    assert out.losses.shape == pc.shape and out.losses.dtype == torch.float32
    assert torch.isfinite(out.losses).all()
    grads = torch.autograd.grad(out.losses.sum(), [pc, pr])
    assert all(torch.isfinite(g).all() for g in grads)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", PAIR_LOSSES)
def test_pairwise_losses_finite_at_beta_margin_1e3(name):
    """β·margins of exactly ±1e3 (β = 0.1, Δ_w − Δ_l = ±1e4), with gradients."""
    u = torch.tensor([-1e3, -1e3 + 0.5, 1e3], dtype=torch.float32, requires_grad=True)
    out = loss_function(name)(*pair_at_u(u), **_pairwise_kwargs(name, 3, torch.float32))
    (grad,) = torch.autograd.grad(out.losses.sum(), u)
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_fn", [L.exo_rw_loss, L.dpo_rw_loss, L.exo_pref_group_loss])
def test_group_losses_finite_at_extremes_float32(loss_fn):
    policy = torch.tensor([[-1e4, 1e4, 0.0], [1e4, 1e4, -1e4], [0.0, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[1e4, -1e4, 0.0], [0.0, 1e4, -1e4], [-1e4, 0.0, 1e4]])
    if loss_fn is L.exo_pref_group_loss:
        out = loss_fn(policy, ref, torch.tensor([0, 1, 2]))
    else:
        out = loss_fn(policy, ref, torch.tensor([[1e3, -1e3, 0.0], [0.0, 1e2, -1e2], [5.0, 5.0, 5.0]]))
    (grad,) = torch.autograd.grad(out.losses.sum(), policy)
    assert out.losses.shape == (3,) and out.rewards.shape == (3, 3) and not out.rewards.requires_grad
    assert torch.isfinite(out.losses).all() and torch.isfinite(grad).all()
