"""SamS over the loop's iterations: a training stage continues the scheduler its predecessor left in final/.

The real `rayalign.train_loop` worker runs under Ray Train's local mode (in this process, no cluster), once
per stage: stage A from scratch; stage B from A's final/ with `StageInputs.sams_state` pointing there (what
the loop passes from iteration 1 on); stage C the same without it. The loop's own wiring is checked on
`rayalign.loop.train_iteration` with the training call captured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rayalign.config_loader import load_config
from tests.test_load_options import local_loop_config, run_locally

SAMS = ["sams.enabled=true", "sams.ratio=0.5", "sams.warmup_fraction=0.5", "ref.cache=false",
        "train.global_batch_size=4", "train.num_workers=1", "train.epochs=2", "optim.lr=5e-4"]


def _stage(policy: str, run_dir: Path, tmp_path: Path, *, carried: str | None = None) -> list[dict]:
    from rayalign.train_loop import train_fn_per_worker

    config = load_config(None, [f"model.policy={policy}", f"run.dir={run_dir}", *SAMS])
    data_dir = tmp_path / f"data-{run_dir.name}"
    data_dir.mkdir()
    loop_config = local_loop_config(config, policy, data_dir, pairs=8)
    loop_config["inputs"]["sams_state"] = carried
    run_locally(train_fn_per_worker, loop_config)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _scheduler(final: Path) -> dict:
    return torch.load(final / "sams.pt", weights_only=True)["scheduler"]


@pytest.mark.slow
def test_a_stage_continues_the_scheduler_left_in_the_previous_final(tiny_model_dir, tmp_path):
    first = _stage(str(tiny_model_dir), tmp_path / "a", tmp_path)
    steps = len(first)  # 8 pairs, 4 a step, 2 epochs
    assert steps == 4 and [m["sams/round"] for m in first] == [1, 2, 3, 4]
    assert [m["sams/warmup"] for m in first] == [1, 1, 0, 0]  # half of the stage's rounds
    final_a = tmp_path / "a" / "final"
    assert _scheduler(final_a)["round"] == steps

    carried = _stage(str(final_a), tmp_path / "b", tmp_path, carried=str(final_a))
    assert [m["sams/round"] for m in carried] == [5, 6, 7, 8]  # the same bandit, still counting
    assert all(m["sams/warmup"] == 0 for m in carried)  # it has learned: no second warm-up
    state_b = _scheduler(tmp_path / "b" / "final")
    assert state_b["round"] == 2 * steps and len(state_b["pool"]) >= len(_scheduler(final_a)["pool"])

    fresh = _stage(str(final_a), tmp_path / "c", tmp_path)
    assert [m["sams/round"] for m in fresh] == [1, 2, 3, 4] and fresh[0]["sams/warmup"] == 1
    # carried networks decide differently from fresh ones: the stages trained apart from the first step on
    assert [m["loss"] for m in carried] != pytest.approx([m["loss"] for m in fresh], abs=1e-7)


@pytest.mark.parametrize(("sams", "iteration", "expected"), [
    ("true", 1, "POLICY"), ("true", 2, "POLICY"), ("true", 0, None), ("false", 1, None)])
def test_the_loop_hands_each_stage_the_previous_final(monkeypatch, tmp_path, sams, iteration, expected):
    import rayalign.judge
    import rayalign.train
    from rayalign import loop
    from rayalign.stage_storage import StageStorage

    config = load_config(None, [f"sams.enabled={sams}", f"run.dir={tmp_path}"])
    captured = {}
    monkeypatch.setattr(rayalign.judge, "training_data", lambda config, data, iteration, **_: ("dpo", data))
    monkeypatch.setattr(rayalign.train, "run_train", lambda *a, inputs, **k: captured.update(inputs=inputs) or 0)
    policy = str(tmp_path / f"iter-{iteration - 1}" / "train" / "final")
    loop.train_iteration(config, tmp_path / f"iter-{iteration}" / "train", policy=policy, reference=policy,
                         data=str(tmp_path / "judged.parquet"), epochs=1, iteration=iteration,
                         storage=StageStorage(config))
    assert captured["inputs"].sams_state == (policy if expected == "POLICY" else None)


def test_the_workers_read_the_carried_state_where_they_run(tmp_path, monkeypatch):
    from rayalign.stage_inputs import StageInputs
    from rayalign.train import worker_inputs

    class Store:  # run.storage's mapping of a driver path to its storage location
        def remote(self, path: str) -> str:
            return "s3://bucket/run/" + path.rsplit("/run/", 1)[1]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run/iter-0/train/final").mkdir(parents=True)  # relative to where the driver runs
    inputs = StageInputs(policy="p", sams_state="run/iter-0/train/final")
    assert worker_inputs(inputs, None).sams_state == str(tmp_path / "run/iter-0/train/final")
    assert worker_inputs(inputs, Store()).sams_state == "s3://bucket/run/iter-0/train/final"
    assert worker_inputs(StageInputs(policy="p"), Store()).sams_state is None
