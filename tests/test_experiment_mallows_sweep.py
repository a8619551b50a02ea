"""experiments/mallows_sweep.py: the paired statistics by hand and a toy-size sweep on the shared HH pairs.

The full experiment (1,847 training pairs, 12 Tune trials) is the README's; here 60 pairs run a 2-trial
sweep (DPO and MallowsPO-theta at one beta and lr) end to end through `rayalign.tune.run_tune` from an SFT'd
tiny model, and the per-pair scoring of each trial's final model must agree with the accuracy its own
training run reported on the same test pairs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from experiments import mallows_sweep as exp


def test_summary_pairs_the_two_losses_on_the_same_test_pairs():
    scored = [{"loss": "dpo", "beta": 0.1, "lr": 1e-4, "correct": [1, 0, 1, 1]},
              {"loss": "mallows_theta", "beta": 0.1, "lr": 1e-4, "correct": [1, 1, 1, 0]},
              {"loss": "dpo", "beta": 0.05, "lr": 1e-4, "correct": [0, 0, 1, 1]}]
    first, second = exp.summarise(scored)
    assert (first["beta"], "mallows_theta" in first, "diff" in first) == (0.05, False, False)
    assert second["dpo"] == pytest.approx((0.75, (0.75 * 0.25 / 4) ** 0.5))
    # per-pair differences [0, 1, 0, -1]: mean 0, sample sd sqrt(2/3)
    assert second["diff"] == pytest.approx((0.0, (2 / 3) ** 0.5 / 2))


@pytest.mark.slow
@pytest.mark.usefixtures("in_process_ray")  # run_tune joins Ray from this process: leave it before the head goes
@pytest.mark.skipif(not exp.HH.exists(), reason=f"the shared HH file is not present at {exp.HH}")
def test_toy_sweep_scores_every_trial_as_its_training_run_did(tmp_path):
    out = tmp_path / "mallows"
    rows = exp.main(["--limit", "60", "--betas", "0.1", "--lrs", "1e-4", "--sft-epochs", "1", "--set",
                     "train.global_batch_size=16", "train.eval_every=3", "--out", str(out)])
    assert len(rows) == 1 and set(rows[0]) >= {"dpo", "mallows_theta", "diff"}
    test_pairs = len((out / "data" / "test.jsonl").read_text().splitlines())
    train_pairs = len((out / "data" / "train.jsonl").read_text().splitlines())
    assert train_pairs + test_pairs <= 60 and test_pairs == int(0.2 * (train_pairs + test_pairs)) > 0
    saved = json.loads((out / "results.json").read_text())
    with open(out / "sweep" / "tune" / "results.csv") as f:
        reported = {row["loss.type"]: float(row["final eval/rewards/accuracies"]) for row in csv.DictReader(f)}
    for trial in saved["trials"]:
        assert len(trial["correct"]) == test_pairs
        assert sum(trial["correct"]) / test_pairs == pytest.approx(reported[trial["loss"]])
    assert Path(out / "mallows_sweep.png").stat().st_size > 0
