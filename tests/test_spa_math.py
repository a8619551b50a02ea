"""Pure-math tests of SPA (spec §5): judging, de-coupled log-probs, thresholds and self-refinement smoothing.

The running pair of spec §1: policy_chosen=−10, policy_rejected=−12, ref_chosen=−11, ref_rejected=−11.5,
β=0.1, so Δ_w = 1, Δ_l = −0.5 and u = 0.15; σ(0.15) = 0.537430. CPU, milliseconds, no Ray.
"""

import math
import random

import pytest
import torch

from rayalign.core.logprobs import sequence_logps
from rayalign.core.losses import dpo_loss
from rayalign.core.spa import (
    MarginWindow,
    implicit_rewards,
    judge_confidence,
    judge_pairs,
    mixed_logps,
    refine_label_smoothing,
    refine_margins,
    refine_threshold,
)

F64 = torch.float64
BETA = 0.1


def _t(*values, dtype=F64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def running_pair():
    return _t(-10.0), _t(-12.0), _t(-11.0), _t(-11.5)


def _refined_loss_and_grad(u_value: float, threshold: float, *, alpha=0.1, active=True):
    """Loss and dL/du at DPO logit u for a pair whose de-coupled margin is u itself (mix = 1)."""
    u = torch.tensor([u_value], dtype=F64, requires_grad=True)
    zero = torch.zeros_like(u)
    margins = refine_margins(u.detach() / BETA, zero, zero, zero, beta=BETA)
    eps = refine_label_smoothing(margins, threshold, alpha=alpha, active=active)
    out = dpo_loss(u / BETA, zero, zero, zero, beta=BETA, label_smoothing=eps)
    (grad,) = torch.autograd.grad(out.losses.sum(), u)
    return out.losses.item(), grad.item(), eps


# ---------------------------------------------------------------- judging


def test_implicit_rewards_worked():
    """β·(logp − logp_sft): 0.1·(−10 − (−11)) = 0.1 and 0.1·(−12 − (−11.5)) = −0.05."""
    pc, pr, rc, rr = running_pair()
    rewards = implicit_rewards(torch.cat([pc, pr]), torch.cat([rc, rr]), beta=BETA)
    assert rewards.tolist() == pytest.approx([0.1, -0.05], abs=1e-12)
    with pytest.raises(ValueError):
        implicit_rewards(pc, rc, beta=0.0)


def test_judge_pairs_argmax_argmin_and_ties():
    """Row 0 [0.1, −0.05]: chosen 0, rejected 1, margin 0.15. Row 1 [−1, 2, 0.5, −3]: chosen 1, rejected 3,
    margin 5. Row 2 [0.7, 0.7]: an exact tie, flagged; argmax/argmin both give sample 0, margin 0."""
    rewards = _t(0.1, -0.05, 0.0, 0.0).reshape(2, 2)
    out = judge_pairs(rewards)
    assert out.chosen_index.tolist() == [0, 0] and out.rejected_index.tolist() == [1, 0]
    assert out.margin.tolist() == pytest.approx([0.15, 0.0], abs=1e-12)
    assert out.tied.tolist() == [False, True]

    wide = judge_pairs(_t(-1.0, 2.0, 0.5, -3.0, 0.7, 0.7, 0.7, 0.7).reshape(2, 4))
    assert wide.chosen_index.tolist() == [1, 0] and wide.rejected_index.tolist() == [3, 0]
    assert wide.margin.tolist() == pytest.approx([5.0, 0.0]) and wide.tied.tolist() == [False, True]

    chosen, rejected, margin, _ = judge_pairs(rewards)  # the spec's three outputs come first
    assert chosen.shape == rejected.shape == margin.shape == (2,)
    with pytest.raises(ValueError):
        judge_pairs(_t(1.0, 2.0).reshape(2, 1))


def test_judge_confidence():
    """σ(0) = 0.5 (a tie); σ(ln 3) = 3/4."""
    assert judge_confidence(_t(0.0, math.log(3.0))).tolist() == pytest.approx([0.5, 0.75])


def test_judgment_does_not_depend_on_beta():
    """argmax/argmin of β·(logp − logp_sft) are scale-free for β > 0: the same pairs for every β."""
    g = torch.Generator().manual_seed(0)
    for k in (2, 4):
        policy = torch.randn(64, k, generator=g, dtype=F64) * 20
        sft = torch.randn(64, k, generator=g, dtype=F64) * 20
        base = judge_pairs(implicit_rewards(policy, sft, beta=0.1))
        for beta in (0.01, 1.0, 7.5):
            other = judge_pairs(implicit_rewards(policy, sft, beta=beta))
            assert torch.equal(base.chosen_index, other.chosen_index)
            assert torch.equal(base.rejected_index, other.rejected_index)


# ---------------------------------------------------------------- de-coupled log-probs


def _random_batch(batch=3, length=6, vocab=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = torch.randn(batch, length, vocab, generator=g) * 3
    ref = torch.randn(batch, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, 4:] = 0
    return policy, ref, labels, mask


def test_mixed_logps_mix_one_is_the_policy():
    """mix = 1: 1·h_θ + 0·h_ref = h_θ, so the result is sequence_logps of the policy logits."""
    policy, ref, labels, mask = _random_batch()
    expected = sequence_logps(policy, labels, mask)
    torch.testing.assert_close(mixed_logps(policy, ref, labels, mask, mix=1.0), expected)


def _two_token_case():
    """One position, vocabulary {0, 1}, label 0: h_θ = [1, 0], h_ref = [0, 0]."""
    policy = torch.tensor([[[1.0, 0.0]]], dtype=F64)
    ref = torch.zeros_like(policy)
    return policy, ref, torch.tensor([[0]]), torch.tensor([[1]])


def test_mixed_logps_extrapolates():
    """mix = 1: −log(1 + e^{−1}) = −0.313262. mix = 1.5: h̃ = 1.5·[1, 0] − 0.5·[0, 0] = [1.5, 0], so
    −log(1 + e^{−1.5}) = −0.201413 > −0.313262: extrapolating away from the reference raises the
    log-prob of the token the policy favours more than the reference does."""
    policy, ref, labels, mask = _two_token_case()
    at_one = mixed_logps(policy, ref, labels, mask, mix=1.0).item()
    at_1_5 = mixed_logps(policy, ref, labels, mask, mix=1.5).item()
    assert at_one == pytest.approx(-0.313262, abs=1e-6)
    assert at_1_5 == pytest.approx(-0.201413, abs=1e-6)
    assert at_1_5 > at_one


def test_mixed_logps_is_not_mixed_logprobs():
    """Mixing log-probs instead: 1.5·logp_θ(0) − 0.5·logp_ref(0) = 1.5·(−0.313262) − 0.5·log ½ = −0.123319,
    and the same for token 1 gives −1.623319; exp of these sums to 1.081212, not 1. Renormalising gives
    back −0.123319 − log 1.081212 = −0.123319 − 0.078094 = −0.201413: the two differ by the normaliser."""
    policy, ref, labels, mask = _two_token_case()
    logits_mixed = mixed_logps(policy, ref, labels, mask, mix=1.5).item()
    mixed_logprobs = 1.5 * torch.log_softmax(policy, -1) - 0.5 * torch.log_softmax(ref, -1)
    assert mixed_logprobs[0, 0, 0].item() == pytest.approx(-0.123319, abs=1e-6)
    log_normaliser = torch.logsumexp(mixed_logprobs, -1).item()
    assert log_normaliser == pytest.approx(0.078094, abs=1e-6)
    assert logits_mixed == pytest.approx(mixed_logprobs[0, 0, 0].item() - log_normaliser, abs=1e-12)


def test_mixed_logps_float32_for_bf16_and_keeps_grad_optional():
    """bf16 logits are upcast before mixing (float32 result); gradients flow if the caller wants them."""
    policy, ref, labels, mask = _random_batch()
    out = mixed_logps(policy.bfloat16(), ref.bfloat16(), labels, mask, mix=1.25)
    assert out.dtype == torch.float32 and out.shape == (3,)
    policy.requires_grad_(True)
    mixed_logps(policy, ref, labels, mask, mix=1.25).sum().backward()
    assert policy.grad is not None


# ---------------------------------------------------------------- margins, threshold, window


def test_refine_margins_worked():
    """With mix = 1 the de-coupled log-probs are the policy's: m = u = 0.1·[(−10 + 12) − (−11 + 11.5)] = 0.15."""
    pc, pr, rc, rr = running_pair()
    assert refine_margins(pc, pr, rc, rr, beta=BETA).item() == pytest.approx(0.15, abs=1e-12)


def test_refine_threshold_w50():
    """Window {i² : i = 0..49} shuffled, W = 50, k = 0.1: j = ⌊5 + 1e-9⌋ = 5, so τ is the midpoint of
    the 6th and 7th smallest, (5² + 6²)/2 = (25 + 36)/2 = 30.5."""
    values = [float(i * i) for i in range(50)]
    random.Random(0).shuffle(values)
    assert refine_threshold(values, k_fraction=0.1) == 30.5
    assert refine_threshold(torch.tensor(values), k_fraction=0.1) == 30.5


def test_refine_threshold_small_windows_and_errors():
    """W = 10, k = 0.1: j = 1, τ = (s[1] + s[2])/2 = (2 + 3)/2 = 2.5 on 1..10. W = 5, k = 0.9: j = ⌊4.5⌋ = 4,
    j+1 = 5 ≥ W raises; so does W = 1 (j = 0, j+1 = 1)."""
    assert refine_threshold([float(v) for v in range(10, 0, -1)], k_fraction=0.1) == 2.5
    with pytest.raises(ValueError, match="j\\+1 < W"):
        refine_threshold([1.0, 2.0, 3.0, 4.0, 5.0], k_fraction=0.9)
    with pytest.raises(ValueError):
        refine_threshold([1.0], k_fraction=0.1)
    with pytest.raises(ValueError):
        refine_threshold([1.0, 2.0, 3.0], k_fraction=1.0)


def test_margin_window_fills_rolls_and_round_trips():
    """τ = 0 until 50 margins are in; then the last 50 count. After 0..59 the window holds 10..59 and
    τ = (15 + 16)/2 = 15.5 (6th and 7th smallest)."""
    window = MarginWindow(50)
    window.extend(torch.arange(0, 30, dtype=torch.float32))
    assert not window.full and window.threshold(k_fraction=0.1) == 0.0
    window.extend([float(v) for v in range(30, 60)])
    assert window.full and len(window) == 50 and window.values()[0] == 10.0
    assert window.threshold(k_fraction=0.1) == 15.5

    restored = MarginWindow(50)
    restored.load_state_dict(window.state_dict())
    assert restored.values() == window.values()
    restored.extend([100.0])
    window.extend([100.0])
    assert restored.threshold(k_fraction=0.1) == window.threshold(k_fraction=0.1) == 16.5
    with pytest.raises(ValueError):
        MarginWindow(10).load_state_dict(window.state_dict())
    window.reset()
    assert len(window) == 0


# ---------------------------------------------------------------- label smoothing and the loss


def test_refine_label_smoothing_values():
    """τ = 0.2, α = 0.1: m = [−1, 0.2, 0.5] -> ε = [0.1, 0.1, 0] (m ≤ τ is not clean, equality included)."""
    margins = _t(-1.0, 0.2, 0.5)
    assert refine_label_smoothing(margins, 0.2, alpha=0.1, active=True).tolist() == pytest.approx([0.1, 0.1, 0.0])
    assert refine_label_smoothing(margins, 0.2, alpha=0.1, active=False).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        refine_label_smoothing(margins, 0.2, alpha=1.5, active=True)


def test_smoothed_pair_worked_numbers():
    """The running pair (u = 0.15) with τ = 0.2 ≥ m = 0.15 gets ε = 0.1: loss 0.9·0.620957 + 0.1·0.770957
    = 0.635957 and dL/du = σ(u) − (1−ε) = 0.537430 − 0.9 = −0.362570. With τ = 0.1 < m it stays clean:
    dL/du = 0.537430 − 1 = −0.462570."""
    loss, grad, eps = _refined_loss_and_grad(0.15, threshold=0.2)
    assert eps.item() == pytest.approx(0.1)
    assert loss == pytest.approx(0.635957, abs=1e-6)
    assert grad == pytest.approx(-0.362570, abs=1e-6)
    clean_loss, clean_grad, clean_eps = _refined_loss_and_grad(0.15, threshold=0.1)
    assert clean_eps.item() == 0.0
    assert clean_loss == pytest.approx(0.620957, abs=1e-6)
    assert clean_grad == pytest.approx(-0.462570, abs=1e-6)


def test_smoothed_loss_minimised_at_logit_09():
    """With ε = 0.1 the gradient σ(u) − 0.9 vanishes at u* = logit(0.9) = ln 9 = 2.197225, and the loss
    is larger on both sides (τ = 10 keeps the pair flagged at every u tried)."""
    u_star = math.log(9.0)
    loss_star, grad_star, _ = _refined_loss_and_grad(u_star, threshold=10.0)
    assert grad_star == pytest.approx(0.0, abs=1e-12)
    for offset in (-0.05, 0.05):
        assert _refined_loss_and_grad(u_star + offset, threshold=10.0)[0] > loss_star


def test_refinement_is_dpo_when_alpha_zero_inactive_or_all_clean():
    """α = 0, inactive (before the warm start), or every m > τ: ε ≡ 0, so the loss is DPO exactly."""
    g = torch.Generator().manual_seed(1)
    logps = [torch.randn(16, generator=g, dtype=F64) * 5 for _ in range(4)]
    margins = refine_margins(*logps, beta=BETA)
    plain = dpo_loss(*logps, beta=BETA).losses
    for threshold, alpha, active in (
        (margins.max().item(), 0.0, True),
        (1e9, 0.1, False),
        (margins.min().item() - 1.0, 0.1, True),
    ):
        eps = refine_label_smoothing(margins, threshold, alpha=alpha, active=active)
        torch.testing.assert_close(dpo_loss(*logps, beta=BETA, label_smoothing=eps).losses, plain)
