"""experiments/gdpo_opinions.py at toy size: its information-matched control and its held-out questions.

The full experiment (5 seeds, 3 arms, 300 steps) is the README's; here one seed of a 6-question task runs
every arm end to end, and the two things that make its comparison fair are checked directly: the control's
target is exactly each prompt's histogram of sampled beliefs, and no training or SFT row asks a held-out
question.
"""

from __future__ import annotations

import json
import math

import pytest

from experiments import gdpo_opinions as exp


def test_the_control_target_is_each_prompts_histogram_of_sampled_beliefs():
    rows = [{"group": "A", "question": 0, "belief": b, "target": [0.1, 0.2, 0.3, 0.2, 0.1, 0.1]} for b in (1, 1, 3)]
    rows.append({"group": "B", "question": 0, "belief": 5, "target": [0.5, 0, 0, 0, 0, 0.5]})
    matched = exp.with_histogram_targets(rows)
    assert [r["target"] for r in matched[:3]] == [[0, 2 / 3, 0, 1 / 3, 0, 0]] * 3
    assert matched[3]["target"] == [0, 0, 0, 0, 0, 1.0]
    assert [r["belief"] for r in matched] == [1, 1, 3, 5] and rows[0]["target"][0] == 0.1  # input untouched


@pytest.mark.slow
def test_toy_run_of_every_arm_keeps_held_out_questions_out_of_training(tmp_path):
    results = exp.main(["--seeds", "0", "--questions", "6", "--heldout-questions", "2", "--epochs", "1",
                        "--sft-epochs", "1", "--eval-every", "2", "--out", str(tmp_path)])
    paths = {"train": tmp_path / "seed0/data/train.jsonl", "test_prompts": tmp_path / "seed0/data/test_prompts.jsonl",
             "heldout": tmp_path / "seed0/data/heldout_questions.json"}
    heldout = set(json.loads(paths["heldout"].read_text()))
    rows, tests = exp.load_split(paths)
    assert len(heldout) == 2 and rows and not {r["question"] for r in rows} & heldout
    assert {t["question"] for t in tests["unseen"]} == heldout and len(tests["unseen"]) == 2 * 4  # every group
    assert not {t["question"] for t in tests["seen"]} & heldout
    # 6 questions - 2 held out = 4, x 4 groups x 8 rows = 128 rows: 4 steps of 32 in one epoch
    assert set(results["runs"]["0"]) == set(exp.ARMS)
    for arm, points in results["runs"]["0"].items():
        assert [p["step"] for p in points] == [0, 2, 4], arm
        for point in points:
            for measured in (point, point["unseen"]):
                assert 0 <= measured["gap_a"] <= 1 and 0 <= measured["gap_b"] <= 1 and not math.isnan(measured["gap_a"])
    assert results["runs"]["0"]["dpo"][0]["gap_a"] == results["runs"]["0"]["gdpo"][0]["gap_a"]  # same pi_SFT
    assert "gdpo_hist - dpo" in exp.table(results) and (tmp_path / "gap_curves.png").stat().st_size > 10_000
