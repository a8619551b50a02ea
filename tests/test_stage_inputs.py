"""A training stage's run state (models, data, epochs, SPA mix) travels as `StageInputs`, apart from the
user's settings: the loop no longer rewrites the config per stage, and no worker recomputes the mix."""

import dataclasses

import pytest

from rayalign.config_loader import load_config
from rayalign.stage_inputs import StageInputs
from rayalign.stage_storage import StageStorage


def test_from_config_is_what_a_stand_alone_stage_trains():
    config = load_config(None, ["model.policy=p", "data.train_file=t.jsonl", "data.eval_fraction=0.2",
                                "train.epochs=2", "spa.refine=true", "spa.iteration=2"])
    assert StageInputs.from_config(config) == StageInputs(policy="p", train_file="t.jsonl", eval_fraction=0.2,
                                                          epochs=2, spa_mix=1.25)
    assert StageInputs.from_config(load_config(None, [])).spa_mix is None  # no refinement, no mix
    inputs = StageInputs.from_config(config)
    assert StageInputs(**inputs.to_dict()) == inputs  # through Ray Train's train_loop_config and back


def test_mix_for_keeps_the_last_entry_past_the_schedule():
    spa = load_config(None, ["spa.mix_schedule=[1.5,1.25]"]).spa
    assert [spa.mix_for(i) for i in (1, 2, 3, 7)] == [1.5, 1.25, 1.25, 1.25]


@pytest.mark.parametrize("iteration, mix", [(0, None), (1, 1.5), (2, 1.25), (5, 1.25)])
def test_the_loop_passes_inputs_and_leaves_the_config_as_written(tmp_path, monkeypatch, iteration, mix):
    from rayalign import loop, train

    seen = {}

    def run_train(config, *, resume, storage, inputs, tracking=None, push_weights=None):
        seen.update(config=config, inputs=inputs)
        return 0

    monkeypatch.setattr(train, "run_train", run_train)
    config = load_config(None, ["spa.refine=true", "spa.mix_schedule=[1.5,1.25]", "train.epochs=7",
                                f"run.dir={tmp_path}"])
    loop.train_iteration(config, tmp_path / "iter" / "train", policy="prev", reference="ref", data="d.parquet",
                         epochs=3, iteration=iteration, storage=StageStorage(config))
    assert seen["inputs"] == StageInputs(policy="prev", reference="ref", train_file="d.parquet", epochs=3,
                                         spa_mix=mix)
    stage = seen["config"]
    assert stage.run.dir == str(tmp_path / "iter" / "train")
    assert dataclasses.replace(stage, run=config.run) == config  # every other section as the user wrote it


def test_iteration_0_of_a_k_sample_loss_trains_dpo_through_its_inputs(tmp_path, monkeypatch):
    from rayalign import loop, train

    seen = {}
    monkeypatch.setattr(train, "run_train", lambda config, **kw: seen.update(config=config, **kw) or 0)
    config = load_config(None, ["loss.type=exo_rw", f"run.dir={tmp_path}"])
    loop.train_iteration(config, tmp_path / "iter" / "train", policy="sft", reference="sft", data="seed.jsonl",
                         epochs=1, iteration=0, storage=StageStorage(config))
    assert seen["inputs"].loss_type == "dpo"
    assert seen["config"].loss.type == "exo_rw"  # the user's setting; the stage's loss is in its inputs
    assert seen["inputs"].stage_config(seen["config"]).loss.type == "dpo"


def test_iteration_0_reads_the_users_seed_pairs_with_their_split_and_subset(tmp_path, monkeypatch):
    from rayalign import loop, train

    seen = []
    monkeypatch.setattr(train, "run_train", lambda config, **kw: seen.append(kw["inputs"]) or 0)
    config = load_config(None, ["data.train_file=uf", "data.split=train_prefs", "data.subset=en",
                                f"run.dir={tmp_path}"])
    for iteration, data in ((0, "uf"), (1, "judged.parquet")):
        loop.train_iteration(config, tmp_path / f"it{iteration}", policy="p", reference="r", data=data, epochs=1,
                             iteration=iteration, storage=StageStorage(config))
    assert [(i.train_file, i.split, i.subset) for i in seen] == [("uf", "train_prefs", "en"),
                                                                 ("judged.parquet", "train", None)]
