"""experiments/spa_refine.py: the noise-detection bookkeeping by hand, and a toy-size run of every arm.

The full experiment (5 seeds, 2 iterations of 1,600 prompts, 100 steps each) is the README's; here the
precision/recall arithmetic is checked on a hand-made record, and one seed of a few prompts runs every arm
end to end: iteration 1 judges pi_0's samples once for all arms, mix = 1 and mix = 1 + lambda are what the
two refinement arms train with, and every flagged pair is counted.
"""

from __future__ import annotations

import json

import pytest

from experiments import spa_refine as exp


def test_detection_counts_flags_and_errors_of_the_active_steps_only():
    pairs = [{"gold_error": True}, {"gold_error": False}, {"gold_error": None}, {"gold_error": True}]
    record = [([0, 1, 2, 3], (False, [True, True, True, True])),  # the warm start: not counted
              ([3, 1, 0, 2], (True, [True, True, False, True])),  # pair 2's gold rewards tie: neither
              ([0, 3], (True, [False, False]))]
    got = exp.detection(record, pairs)
    # active occurrences with a gold order: 3, 1, 0 (step 2) and 0, 3 (step 3); errors among them: 3, 0, 0, 3
    assert got == {"precision": 0.5, "recall": 0.25, "base_rate": 0.8, "flagged": 2}


def test_the_arms_train_with_the_mix_they_are_named_for():
    configs = {arm: exp.train_config(overrides, iteration=2, epochs=1, lr=1e-4, batch=4, seed=0)
               for arm, overrides in exp.ARMS.items()}
    assert not configs["no_refine"].spa.refine
    assert configs["refine_1"].spa.mix_for(2) == 1.0
    assert configs["refine"].spa.mix_for(2) == 1.25 and configs["refine"].spa.window == 50


@pytest.mark.slow
def test_toy_run_of_every_arm(tmp_path):
    out = tmp_path / "spa"
    summary = exp.main(["--seeds", "1", "--prompts", "96", "--eval-prompts", "4", "--batch", "8", "--epochs", "2",
                        "--seed-pairs", "16", "--seed-epochs", "1", "--sft-examples", "48", "--sft-epochs", "1",
                        "--max-new-tokens", "10", "--out", str(out)])
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert list(run["arms"]) == list(exp.ARMS)
    first = [records[0] for records in run["arms"].values()]
    assert len({(r["pairs"], r["judge_accuracy"]) for r in first}) == 1  # iteration 1: one judgment, shared
    for arm, records in run["arms"].items():
        assert [r["iteration"] for r in records] == [1, 2] and all(r["steps"] > 0 for r in records)
        assert all(0.0 <= r["win_vs_previous"] <= 1.0 for r in records)
        assert ("flagged" in records[0]) == (arm != "no_refine")
    assert all(r["flagged"] > 0 for arm in ("refine_1", "refine") for r in run["arms"][arm])
    assert set(summary["vs_no_refine"]) == {"refine_1", "refine"} and (out / "spa_refine.png").stat().st_size > 0
