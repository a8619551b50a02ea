"""Pure-math tests of SamS (spec §6): rewards, selection, context features, networks and the scheduler.

Hand-derived numbers are in each docstring. The scheduler tests use tiny networks on synthetic contexts
and run single-threaded (see `_one_thread`). CPU, a few seconds, no Ray.
"""

import io
import math

import pytest
import torch

from rayalign.core.sams import (
    Encoder,
    ResidualMLP,
    SamsScheduler,
    batch_reward,
    combined_reward,
    context_features,
    num_selected,
    pool_hidden,
    sample_rewards,
    select_top_k,
)

F64 = torch.float64
L, D = 2, 8
TINY = dict(num_layers=L, hidden_size=D, d=16, num_heads=4, width=32, depth=2)


@pytest.fixture(autouse=True)
def _one_thread():
    """The scheduler's matrices are tiny: on a busy 2-core host OpenMP fan-out makes each op ~500× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(g: torch.Generator, n: int = 12):
    """Synthetic round: contexts, a mean loss, margins and chosen log-probs."""
    context = torch.randn(n, L, D, generator=g)
    mean_loss = 0.7 + 0.1 * torch.rand((), generator=g).item()
    return context, mean_loss, torch.randn(n, generator=g), -5 * torch.rand(n, generator=g)


def _run(scheduler: SamsScheduler, g: torch.Generator, rounds: int, sizes=(12,)):
    selections = []
    for r in range(rounds):
        context, mean_loss, margins, chosen = _batch(g, sizes[r % len(sizes)])
        selections.append(scheduler.schedule(context, mean_loss=mean_loss, margins=margins, chosen_logps=chosen))
    return selections


# ---------------------------------------------------------------- rewards and selection


def test_sample_rewards_hand_numbers():
    """m = [0, 1, 2] -> g = [0, 0.5, 1]; −logp_w = [1, 3, 2] -> g = [0, 1, 0.5] (the 1e-8 is negligible).
    δ = 0.25: 0.25·[0, 0.5, 1] + 0.75·[0, 1, 0.5] = [0, 0.875, 0.625]."""
    rewards = sample_rewards(
        torch.tensor([0.0, 1.0, 2.0], dtype=F64), torch.tensor([-1.0, -3.0, -2.0], dtype=F64), delta=0.25
    )
    assert rewards.tolist() == pytest.approx([0.0, 0.875, 0.625], abs=1e-7)
    constant = sample_rewards(torch.ones(4), torch.ones(4), delta=0.5)
    assert constant.tolist() == [0.0] * 4  # max = min: g is 0, not NaN


def test_batch_reward_hand_numbers():
    """prev 0.7, cur 0.6: A = e^0.7 = 2.013753, B = e^0.6 = 1.822119, (A − B)/A = 1 − e^{−0.1} = 0.095163.
    Reversed: (A − B)/B = e^{−0.1} − 1 = −0.095163. Equal losses: 0. Losses 1000 and 999 (e^1000 overflows
    float64): 1 − e^{−1} = 0.632121."""
    assert batch_reward(0.7, 0.6).item() == pytest.approx(0.095163, abs=1e-6)
    assert batch_reward(0.6, 0.7).item() == pytest.approx(-0.095163, abs=1e-6)
    assert batch_reward(0.5, 0.5).item() == 0.0
    assert batch_reward(torch.tensor(1000.0), torch.tensor(999.0)).item() == pytest.approx(0.632121, abs=1e-6)
    a, b = math.exp(1.3), math.exp(0.4)
    assert batch_reward(1.3, 0.4).item() == pytest.approx((a - b) / max(a, b), rel=1e-12)


def test_combined_reward_hand_numbers():
    """r_B = 0 -> σ = 0.5; r_S = [0, ln 3] -> σ = [0.5, 0.75]; γ = 0.5: [0.5, 0.625]. γ = 1: σ(r_B) only."""
    r_s = torch.tensor([0.0, math.log(3.0)])
    assert combined_reward(0.0, r_s, gamma=0.5).tolist() == pytest.approx([0.5, 0.625])
    assert combined_reward(torch.tensor(0.0, dtype=F64), r_s, gamma=1.0).tolist() == pytest.approx([0.5, 0.5])


def test_num_selected_and_top_k():
    """K = ⌈ρ·n⌉: ρ = 0.5 on 7 -> 4; ρ = 0.7 on 10 -> 7 (0.7·10 = 7.000000000000001 must not give 8); at
    least 1. Scores [1, 3, 3, 0, 3] with ρ = 0.4 -> K = 2; the three 3s tie and the lower indices win: [1, 2]."""
    assert num_selected(7, ratio=0.5) == 4
    assert num_selected(10, ratio=0.7) == 7
    assert num_selected(3, ratio=0.01) == 1
    assert select_top_k(torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0]), ratio=0.4).tolist() == [1, 2]
    assert select_top_k(torch.tensor([0.2, 0.9, -1.0, 0.5]), ratio=0.5).tolist() == [1, 3]
    assert select_top_k(torch.randn(9), ratio=1.0).tolist() == list(range(9))
    with pytest.raises(ValueError):
        num_selected(4, ratio=0.0)


def test_context_features_manual_mean():
    """2 pairs, T = 4, D = 3, embeddings + 2 blocks. Row means over attention-mask-1 positions only (padded
    positions hold NaN and must not leak), then (chosen + rejected)/2 per pair; the embeddings (index 0,
    set to 1e6) are skipped, so L = 2."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    blocks = [torch.randn(4, 4, 3, generator=g) for _ in range(2)]
    for block in blocks:
        block[mask == 0] = float("nan")
    hidden_states = (torch.full((4, 4, 3), 1e6), *blocks)
    features = context_features(hidden_states, mask)
    assert features.shape == (2, 2, 3)
    for pair in range(2):
        for layer, block in enumerate(blocks):
            chosen_row, rejected_row = block[pair], block[pair + 2]
            chosen = chosen_row[: int(mask[pair].sum())].mean(0)
            rejected = rejected_row[: int(mask[pair + 2].sum())].mean(0)
            torch.testing.assert_close(features[pair, layer], (chosen + rejected) / 2)
    bf16 = context_features(tuple(h.bfloat16() for h in hidden_states), mask)
    assert bf16.dtype == torch.float32 and not bf16.requires_grad


def test_networks_shapes_and_pooling():
    """Encoder output is unit-norm (N, d); the residual MLP gives (N,) scores and (N, depth·width) hidden;
    pooling [1..8] by blocks of 4 gives [2.5, 6.5]."""
    encoder = Encoder(L, D, d=16, num_heads=4)
    x = encoder(torch.randn(5, L, D))
    assert x.shape == (5, 16)
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(5))
    score, hidden = ResidualMLP(16, width=32, depth=3)(x)
    assert score.shape == (5,) and hidden.shape == (5, 96) and pool_hidden(hidden).shape == (5, 24)
    assert pool_hidden(torch.arange(1.0, 9.0).unsqueeze(0)).tolist() == [[2.5, 6.5]]
    with pytest.raises(ValueError):
        encoder(torch.randn(5, L + 1, D))


# ---------------------------------------------------------------- the scheduler


def test_exactly_k_selected_each_step():
    """Warm-up (random) and bandit rounds alike select ⌈ρ·n⌉ distinct pairs, also for a short last batch."""
    scheduler = SamsScheduler(**TINY, ratio=0.5, warmup_steps=3, pool_size=4, pool_batches=2)
    sizes = (12, 12, 7, 1)
    for r, selection in enumerate(_run(scheduler, torch.Generator().manual_seed(0), 8, sizes)):
        n = sizes[r % len(sizes)]
        assert selection.indices.shape == (num_selected(n, ratio=0.5),)
        assert selection.indices.unique().numel() == selection.indices.numel()
        assert selection.indices.min() >= 0 and selection.indices.max() < n
        assert selection.warmup == (r < 3) and selection.scores.shape == (n,)
    assert len(scheduler.pool) == 4  # 7 updates, capacity 4


def test_ratio_one_selects_all():
    scheduler = SamsScheduler(**TINY, ratio=1.0, warmup_steps=2)
    for selection in _run(scheduler, torch.Generator().manual_seed(0), 4):
        assert selection.indices.tolist() == list(range(12))


def test_selection_deterministic_given_seed_and_global_rng_untouched():
    """Same seed and stream -> identical selections; the trainer's global RNG stream does not move."""
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    runs = [_run(SamsScheduler(**TINY, warmup_steps=2, seed=7), torch.Generator().manual_seed(1), 5) for _ in range(2)]
    assert torch.equal(torch.rand(3), expected_next)
    for a, b in zip(*runs):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    other = _run(SamsScheduler(**TINY, warmup_steps=2, seed=8), torch.Generator().manual_seed(1), 5)
    assert any(not torch.equal(a.scores, b.scores) for a, b in zip(runs[0], other))


def test_first_round_learns_nothing_then_every_parameter_moves():
    """Round 1 has no previous record: no update (fit_loss NaN). Round 2 trains on round 1's batch and
    changes every parameter tensor of the encoder, f_S and f_S′."""
    scheduler = SamsScheduler(**TINY, warmup_steps=1)
    g = torch.Generator().manual_seed(0)
    before = {k: v.clone() for k, v in scheduler.networks.state_dict().items()}
    (first,) = _run(scheduler, g, 1)
    assert math.isnan(first.fit_loss)
    assert all(torch.equal(before[k], v) for k, v in scheduler.networks.state_dict().items())
    (second,) = _run(scheduler, g, 1)
    assert math.isfinite(second.fit_loss)
    unchanged = [k for k, p in scheduler.networks.named_parameters() if torch.equal(before[k], p)]
    assert unchanged == []


def test_lagged_reward_uses_round_t_minus_1_record_and_current_loss():
    """The reward learnt at round 2 is γσ(r_B) + (1−γ)σ(r_S) with r_B from round 1's and round 2's mean
    losses and r_S from round 1's margins and chosen log-probs; its residual target is r − f̂_S(round 1)."""
    scheduler = SamsScheduler(**TINY, gamma=0.3, delta=0.6)
    g = torch.Generator().manual_seed(3)
    c1, loss1, m1, lp1 = _batch(g)
    scheduler.schedule(c1, mean_loss=loss1, margins=m1, chosen_logps=lp1)
    prediction1 = scheduler.record["prediction"]
    c2, loss2, m2, lp2 = _batch(g)
    scheduler.schedule(c2, mean_loss=loss2, margins=m2, chosen_logps=lp2)
    expected = combined_reward(batch_reward(loss1, loss2), sample_rewards(m1, lp1, delta=0.6), gamma=0.3)
    (entry,) = scheduler.pool
    torch.testing.assert_close(entry["reward"], expected)
    torch.testing.assert_close(entry["residual"], expected - prediction1)
    assert torch.equal(entry["context"], c1)


def test_state_dict_round_trip_mid_run():
    """Save after 6 rounds (through torch.save / torch.load(weights_only=True)), load into a fresh scheduler
    built with another seed, continue both for 6 rounds: identical selections, scores and parameters."""
    settings = dict(TINY, warmup_steps=3, pool_size=3, pool_batches=2, dropout=0.1)
    original = SamsScheduler(**settings, seed=0)
    _run(original, torch.Generator().manual_seed(5), 6)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = SamsScheduler(**settings, seed=99)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    a = _run(original, torch.Generator().manual_seed(6), 6, sizes=(12, 9))
    b = _run(resumed, torch.Generator().manual_seed(6), 6, sizes=(12, 9))
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices) and torch.equal(x.scores, y.scores)
    for (name, p), q in zip(original.networks.state_dict().items(), resumed.networks.state_dict().values()):
        assert torch.equal(p, q), name
    assert original.round == resumed.round == 12
    with pytest.raises(ValueError):
        SamsScheduler(**dict(settings, width=64)).load_state_dict(original.state_dict())


def test_invalid_settings_raise():
    for bad in (dict(ratio=0.0), dict(width=30), dict(gamma=1.5), dict(updates_per_round=0), dict(d=18)):
        with pytest.raises(ValueError):
            SamsScheduler(**dict(TINY, **bad))


def test_scheduler_learns_a_reward_that_depends_on_the_context():
    """Synthetic stream: margins m = 3·c[:, 0, 0], constant chosen log-probs and mean loss, δ = 1, γ = 0, so
    the reward σ(g(m)) is a fixed increasing function of one context feature. After 30 rounds f_S's
    predictions on fresh contexts correlate with that feature (Pearson > 0.5; 0.62–0.84 over scheduler seeds
    0–5, against −0.2…0.3 untrained)."""
    scheduler = SamsScheduler(
        **TINY, dropout=0.0, lr=3e-3, updates_per_round=4, gamma=0.0, delta=1.0, pool_size=50, pool_batches=2, seed=0
    )
    g = torch.Generator().manual_seed(100)
    probe = torch.randn(512, L, D, generator=g)

    def correlation() -> float:
        return torch.corrcoef(torch.stack([scheduler.predict(probe), probe[:, 0, 0]]))[0, 1].item()

    untrained = correlation()
    for _ in range(30):
        context = torch.randn(32, L, D, generator=g)
        scheduler.schedule(context, mean_loss=0.7, margins=3 * context[:, 0, 0], chosen_logps=torch.zeros(32))
    trained = correlation()
    assert trained > 0.5 and trained > untrained + 0.2
