"""experiments/exo_vs_dpo.py: the frontier arithmetic by hand, the pairs DPO gets, and a toy-size run.

The full experiment (5 seeds, 3 arms, 3 betas, 96 steps each) is the README's; here one seed of a few
prompts runs every arm end to end, and the pieces its comparison rests on are checked directly: the
Pareto front and its reading at a KL budget, DPO's pairs being every ordered pair of distinct rewards, and
pi_SFT's KL to itself being exactly 0 (the KL is scored on the samples' own token ids).
"""

from __future__ import annotations

import json
import math

import pytest

from experiments import exo_vs_dpo as exp


def test_front_reward_reads_the_pareto_front_linearly_up_to_the_farthest_point():
    points = [(0.0, 0.0), (1.0, 2.0), (2.0, 1.0), (3.0, 4.0)]  # (2, 1) is dominated by (1, 2)
    assert exp.front_reward(points, 0.0) == 0.0
    assert exp.front_reward(points, 0.5) == pytest.approx(1.0)
    assert exp.front_reward(points, 2.0) == pytest.approx(3.0)  # between (1, 2) and (3, 4), not through (2, 1)
    assert exp.front_reward(points, 3.0) == 4.0
    assert math.isnan(exp.front_reward(points, 3.5))
    explored = [(0.0, 0.0), (1.0, 2.0), (2.0, 1.0)]  # the best point is not the farthest one
    assert exp.front_reward(explored, 1.5) == 2.0 and math.isnan(exp.front_reward(explored, 2.5))


def test_dpo_gets_every_pair_of_distinct_rewards_with_the_higher_chosen():
    groups = [{"prompt": "p", "completions": ["a", "b", "c", "d"], "rewards": [1, 3, 1, 0]}]
    pairs = {(r["chosen"], r["rejected"]) for r in exp.all_pairs(groups)}
    assert pairs == {("b", "a"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")}  # a-c tie dropped


@pytest.mark.slow
def test_toy_run_measures_every_arm_and_beta(tmp_path):
    out = tmp_path / "exo"
    summary = exp.main(["--seeds", "1", "--prompts", "8", "--eval-prompts", "4", "--betas", "0.1", "1.0",
                        "--batch", "4", "--epochs", "2", "--eval-every", "2", "--sft-examples", "48",
                        "--sft-epochs", "1", "--max-new-tokens", "12", "--kl-budgets", "0", "100",
                        "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    run = saved["runs"][0]
    assert run["sft"]["kl"] == 0.0  # pi_SFT scored against itself on its own samples
    assert set(run["arms"]) == set(exp.ARMS)
    for arm in exp.ARMS:
        assert set(run["arms"][arm]) == {"0.1", "1.0"}
        for points in run["arms"][arm].values():
            assert [p["step"] for p in points] == [2, 4]
            assert all(math.isfinite(p["kl"]) and math.isfinite(p["gold_reward"]) for p in points)
    for arm in exp.ARMS:  # a budget of 0 is on every front (pi_SFT's point), 100 nats is beyond every front
        (mean, se, n), (beyond, _, reached) = summary["arms"][arm]
        assert n == 1 and math.isfinite(mean) and se == 0.0 and reached == 0 and math.isnan(beyond)
    assert (out / "frontier.png").stat().st_size > 0
