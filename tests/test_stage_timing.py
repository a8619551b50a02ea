"""`rayalign.stage_timing`: the actors' per-row seconds, a pass's and a training stage's parts, and an
iteration's `time/*` keys, on hand numbers."""

import json

import pandas as pd
import pytest

from rayalign.stage_timing import (
    ACTOR_START,
    GENERATE,
    JUDGE,
    TRAIN_FILE,
    ActorClock,
    drop_timing,
    iteration_seconds,
    pass_file,
    pass_seconds,
    read_iteration_seconds,
    train_seconds,
)


def test_actor_clock_spreads_a_batch_over_its_rows_and_reports_start_up_once():
    clock = ActorClock()
    clock.start_seconds = 2.0  # as `ready()` measured it
    first = clock.stamp(pd.DataFrame({"x": [1, 2, 3, 4]}), GENERATE, began=0.0)
    assert first[ACTOR_START].tolist() == [2.0, 0.0, 0.0, 0.0]
    assert first[GENERATE].nunique() == 1 and first[GENERATE].iloc[0] > 0  # the batch's seconds / 4 rows
    second = clock.stamp(pd.DataFrame({"x": [5]}), GENERATE, began=0.0)
    assert second[ACTOR_START].tolist() == [0.0]
    judged = clock.stamp(first.assign(**{ACTOR_START: [1.0, 0.0, 0.0, 0.0]}), JUDGE, began=0.0)
    assert judged[ACTOR_START].tolist() == [1.0, 0.0, 0.0, 0.0]  # a chained actor adds its own start-up
    assert list(drop_timing(judged).columns) == ["x"]


def test_a_pass_splits_into_the_iteration_and_the_evaluation():
    rows = pd.DataFrame({GENERATE: [1.0, 2.0, 4.0], JUDGE: [0.5, 0.5, 1.0], ACTOR_START: [3.0, 0.0, 0.0]})
    is_eval = pd.Series([False, False, True])
    seconds = pass_seconds(rows, is_eval, wall=15.0)
    assert seconds == {"sample_pass": 15.0, "actor_start": 3.0, "generate": 3.0, "judge": 1.0, "evaluate": 5.0,
                       "pass_other": 3.0}
    assert pass_seconds(rows, is_eval, wall=5.0)["pass_other"] == 0.0  # overlapping busy times: never negative


def test_training_parts_and_an_iteration_record(tmp_path):
    training = train_seconds(load=0.5, prepare=2.0, fit=12.0, worker={"start": 3.0, "steps": 4.0, "save": 1.5})
    assert training == {"load": 0.5, "prepare": 2.0, "fit": 12.0, "train_start": 6.5, "train": 4.0, "save": 1.5}
    sampling = {"sample_pass": 9.0, "actor_start": 4.0, "generate": 2.0, "judge": 1.0, "evaluate": 1.5,
                "pass_other": 0.5}
    evaluation = {**sampling, "evaluate": 2.5}
    assert iteration_seconds(sampling, training, evaluation) == {
        "time/sample_pass": 9.0, "time/actor_start": 4.0, "time/generate": 2.0, "time/judge": 1.0,
        "time/pass_other": 0.5, "time/prepare": 2.5, "time/train_start": 6.5, "time/train": 4.0, "time/save": 1.5,
        "time/evaluate": 2.5}
    # from the files: iteration 1 was sampled by the pass that evaluated iter-0, and evaluated by iter-1's
    for name, value in (("iter-0", sampling), ("iter-1", evaluation)):
        pass_file(tmp_path, name).parent.mkdir(parents=True, exist_ok=True)
        pass_file(tmp_path, name).write_text(json.dumps(value))
    (tmp_path / "iter-1" / "train").mkdir(parents=True)
    (tmp_path / "iter-1" / "train" / TRAIN_FILE).write_text(json.dumps(training))
    assert read_iteration_seconds(tmp_path, 1) == iteration_seconds(sampling, training, evaluation)
    assert read_iteration_seconds(tmp_path, 3) == {}  # nothing stored (a run from before timings): left out
    assert read_iteration_seconds(tmp_path, 0)["time/evaluate"] == pytest.approx(1.5)  # iter-0's evaluation
