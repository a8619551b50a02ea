"""Pure-math tests for rayalign.core.metrics (CPU, milliseconds).

Worked numbers are derived by hand in each docstring; `_reference_js` recomputes the JS distance with
plain Python `math` (no torch, numpy or scipy) as an independent check.
"""

import math
import random

import pytest
import torch

from rayalign.core.metrics import (
    JS_DISTANCE_MAX,
    js_distance,
    kl_divergence,
    renormalize,
    reward_accuracy,
    reward_margins,
    sequence_kl_estimate,
    win_rate,
)

# ALGORITHMS.md §3 worked example: the group's belief distribution p* and the policy's full-vocabulary
# probabilities of the six level digits q (they sum to 0.9: 10% of the mass is on non-digit tokens).
P_STAR = [0.02, 0.10, 0.30, 0.08, 0.40, 0.10]
Q_FULL_VOCAB = [0.01, 0.15, 0.20, 0.10, 0.30, 0.14]


def _reference_kl(p: list[float], q: list[float]) -> float:
    return sum(pk * math.log(pk / qk) for pk, qk in zip(p, q) if pk > 0)


def _reference_js(p: list[float], q: list[float]) -> float:
    m = [(pk + qk) / 2 for pk, qk in zip(p, q)]
    return math.sqrt(0.5 * _reference_kl(p, m) + 0.5 * _reference_kl(q, m))


def test_js_distance_spec_worked_example():
    """ALGORITHMS.md §3: JS(p*, q renormalised) = 0.116595.

    q / 0.9 = [0.011111, 0.166667, 0.222222, 0.111111, 0.333333, 0.155556]; m = (p* + q)/2; the divergence
    ½KL(p*‖m) + ½KL(q‖m) = 0.0135945 and its square root is 0.116595.
    """
    q = renormalize(torch.tensor(Q_FULL_VOCAB, dtype=torch.float64))
    got = js_distance(torch.tensor(P_STAR, dtype=torch.float64), q)
    assert got.shape == ()
    assert got.item() == pytest.approx(0.116595, abs=1e-6)
    assert got.item() == pytest.approx(_reference_js(P_STAR, [x / 0.9 for x in Q_FULL_VOCAB]), rel=1e-12)


def test_js_distance_hand_derived_point_mass_vs_uniform():
    """p = [1, 0], q = [½, ½]: m = [¾, ¼].

    KL(p‖m) = ln(4/3); KL(q‖m) = ½ln(⅔) + ½ln 2 = ½ln(4/3). Divergence = ½·ln(4/3) + ¼·ln(4/3) = ¾·ln(4/3)
    = 0.215762, distance sqrt(0.215762) = 0.464501. The zero in p exercises 0·ln 0 = 0.
    """
    got = js_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert got.item() == pytest.approx(math.sqrt(0.75 * math.log(4 / 3)), abs=1e-6)
    assert got.item() == pytest.approx(0.464501, abs=1e-6)


def test_js_distance_identity_symmetry_and_disjoint_bound():
    """JS(p, p) = 0; JS(p, q) = JS(q, p); disjoint supports give the maximum sqrt(ln 2) = 0.832555."""
    p = torch.tensor(P_STAR, dtype=torch.float64)
    q = renormalize(torch.tensor(Q_FULL_VOCAB, dtype=torch.float64))
    assert js_distance(p, p).item() == 0.0
    assert js_distance(p, q).item() == pytest.approx(js_distance(q, p).item(), abs=1e-15)
    disjoint = js_distance(torch.tensor([0.5, 0.5, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.3, 0.7]))
    assert disjoint.item() == pytest.approx(JS_DISTANCE_MAX, abs=1e-6)
    assert JS_DISTANCE_MAX == pytest.approx(0.832555, abs=1e-6)


def test_js_distance_batched_matches_rowwise_and_plain_python():
    """(B, L) inputs give (B,) outputs equal to the row-by-row values and to the plain-Python reference,
    including rows with zeros in one or both distributions. Also a triangle-inequality spot check."""
    rng = random.Random(0)
    rows_p, rows_q = [], []
    for _ in range(20):
        p = [rng.random() * (rng.random() > 0.3) for _ in range(6)]
        q = [rng.random() * (rng.random() > 0.3) for _ in range(6)]
        p[0], q[1] = p[0] + 0.1, q[1] + 0.1  # keep every row non-empty
        rows_p.append([x / sum(p) for x in p])
        rows_q.append([x / sum(q) for x in q])
    p_t, q_t = torch.tensor(rows_p, dtype=torch.float64), torch.tensor(rows_q, dtype=torch.float64)
    got = js_distance(p_t, q_t)
    assert got.shape == (20,)
    for i in range(20):
        assert got[i].item() == pytest.approx(_reference_js(rows_p[i], rows_q[i]), rel=1e-10, abs=1e-12)
        assert got[i].item() == pytest.approx(js_distance(p_t[i], q_t[i]).item(), rel=1e-12)
    assert torch.all((got >= 0) & (got <= JS_DISTANCE_MAX))
    # Triangle inequality: the JS distance is a metric.
    assert js_distance(p_t[0], p_t[2]) <= js_distance(p_t[0], p_t[1]) + js_distance(p_t[1], p_t[2]) + 1e-12


def test_js_distance_float32_identical_rows_are_finite_zero():
    """Rounding must not produce sqrt(negative) = NaN for identical float32 inputs."""
    p = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(0)), dim=-1)
    got = js_distance(p, p.clone())
    assert torch.isfinite(got).all()
    assert torch.all(got == 0)


def test_kl_divergence_spec_worked_number():
    """ALGORITHMS.md §3: KL(p* ‖ q) with q the full-vocabulary (not renormalised) digit probabilities is
    0.158530, the GDPO calibration term of the worked example. Term by term: 0.02·ln2 + 0.10·ln(2/3)
    + 0.30·ln(3/2) + 0.08·ln(0.8) + 0.40·ln(4/3) + 0.10·ln(5/7) = 0.158530."""
    hand = (0.02 * math.log(2) + 0.10 * math.log(2 / 3) + 0.30 * math.log(1.5) + 0.08 * math.log(0.8)
            + 0.40 * math.log(4 / 3) + 0.10 * math.log(5 / 7))
    p, q = torch.tensor(P_STAR, dtype=torch.float64), torch.tensor(Q_FULL_VOCAB, dtype=torch.float64)
    got = kl_divergence(p, q)
    assert got.item() == pytest.approx(0.158530, abs=1e-6)
    assert got.item() == pytest.approx(hand, rel=1e-12)


def test_kl_divergence_hand_derived_and_zero_conventions():
    """KL([½,½] ‖ [0.9,0.1]) = ½ln(5/9) + ½ln 5 = ln(5/3) = 0.510826.
    p_k = 0 contributes 0 whatever q_k is (even q_k = 0); p_k > 0 with q_k = 0 gives +inf; KL(p‖p) = 0."""
    got = kl_divergence(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(math.log(5 / 3), abs=1e-6)
    assert got[1].item() == pytest.approx(math.log(2), abs=1e-6)
    assert kl_divergence(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0])).item() == 0.0
    assert kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])).item() == math.inf


def test_renormalize_sums_to_one():
    """q / Σq over the last dim; the spec's q sums to 0.9, so q[4] = 0.30 becomes 1/3."""
    q = renormalize(torch.tensor([Q_FULL_VOCAB, [1.0, 1.0, 2.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(q.sum(-1), torch.ones(2, dtype=torch.float64))
    assert q[0, 4].item() == pytest.approx(1 / 3)
    assert q[1, 2].item() == pytest.approx(0.5)


def test_reward_accuracy_ties_count_as_wrong():
    """Strictly greater is correct; a tie is 0.0 (TRL's `chosen > rejected`), so an untrained policy whose
    rewards are all 0 has accuracy 0, not ½. Mean of [1, 0, 0, 1] is 0.5."""
    chosen = torch.tensor([0.3, -0.1, 0.0, 2.0])
    rejected = torch.tensor([0.1, 0.2, 0.0, -1.0])
    acc = reward_accuracy(chosen, rejected)
    assert acc.dtype == torch.float32
    assert acc.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert acc.mean().item() == 0.5
    assert reward_accuracy(torch.zeros(3), torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]


def test_reward_margins():
    """chosen − rejected elementwise: [0.3−0.1, −0.1−0.2] = [0.2, −0.3]."""
    got = reward_margins(torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2]))
    assert torch.allclose(got, torch.tensor([0.2, -0.3]))


def test_win_rate_ties_count_half():
    """a vs b: win, loss, tie, win -> (1 + 0 + ½ + 1)/4 = 0.625; win_rate(a,b) + win_rate(b,a) = 1.
    Integer scores give a float result."""
    a, b = torch.tensor([3, 1, 2, 5]), torch.tensor([1, 4, 2, 0])
    assert win_rate(a, b).item() == 0.625
    assert win_rate(a, b).item() + win_rate(b, a).item() == 1.0
    assert win_rate(a, b).is_floating_point()


def test_sequence_kl_estimate_k1():
    """k1 = mean(policy − ref): [(−10)−(−11), (−12)−(−11.5), (−3)−(−3)] = [1, −0.5, 0] -> 0.5/3 = 1/6.

    On-policy check: for categorical π and π_ref, the mean of log π(y) − log π_ref(y) over many y ~ π
    approaches the exact KL(π ‖ π_ref)."""
    got = sequence_kl_estimate(torch.tensor([-10.0, -12.0, -3.0]), torch.tensor([-11.0, -11.5, -3.0]))
    assert got.shape == ()
    assert got.item() == pytest.approx(1 / 6)

    gen = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    ref = torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=torch.float64)
    y = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    estimate = sequence_kl_estimate(pi.log()[y], ref.log()[y])
    assert estimate.item() == pytest.approx(kl_divergence(pi, ref).item(), abs=5e-3)
