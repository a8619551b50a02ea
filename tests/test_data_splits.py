"""data.split / data.eval_split / data.subset and the loop's prompt sources, on local data only.

Builds `DatasetDict.save_to_disk` directories (one laid out like UltraFeedback-binarized), a dataset
repository directory read by `datasets.load_dataset` (with subsets declared in its README) and plain files
in tmp_path. Hub ids take the same `load_dataset(id, subset, split=...)` call but need the network: not
tested here. No model, no Ray.
"""

import io
import json

import pytest

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.data import DataValidationError, Selection, load_rows
from rayalign.data.check import run_data_check
from rayalign.stage_inputs import StageInputs

datasets = pytest.importorskip("datasets")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def ultrafeedback_rows(n: int, start: int = 0) -> list[dict]:
    """UltraFeedback-binarized rows: prompt string, whole conversations as chosen/rejected, scores."""
    rows = []
    for i in range(start, start + n):
        prompt = f"Question {i}: what is {i} plus {i}?"
        rows.append({"prompt": prompt, "prompt_id": f"id{i}",
                     "chosen": [user(prompt), assistant(f"It is {2 * i}.")],
                     "rejected": [user(prompt), assistant(f"Maybe {i}.")],
                     "messages": [user(prompt), assistant(f"It is {2 * i}.")],
                     "score_chosen": 8.0 + i % 2, "score_rejected": 3.5})
    return rows


def make_ultrafeedback(path, train: int = 6, test: int = 3):
    """A local DatasetDict with UltraFeedback-binarized's split names (train_prefs/test_prefs, *_gen)."""
    gen = [{"prompt": r["prompt"], "prompt_id": r["prompt_id"], "messages": r["messages"]}
           for r in ultrafeedback_rows(5, start=100)]
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ultrafeedback_rows(train)),
                          "test_prefs": datasets.Dataset.from_list(ultrafeedback_rows(test, start=50)),
                          "train_gen": datasets.Dataset.from_list(gen)}).save_to_disk(path)
    return path


@pytest.fixture(scope="module")
def ultrafeedback_dir(tmp_path_factory):
    return make_ultrafeedback(tmp_path_factory.mktemp("uf") / "ultrafeedback")


def test_ultrafeedback_dataset_dict_splits(ultrafeedback_dir):
    data = load_rows(ultrafeedback_dir, select=Selection(split="train_prefs"))
    assert data.format == "ultrafeedback" and len(data.rows) == 6
    assert data.rows[1] == {"prompt": "\n\nHuman: Question 1: what is 1 plus 1?\n\nAssistant:", "chosen": " It is 2.",
                            "rejected": " Maybe 1.", "score_chosen": 9.0, "score_rejected": 3.5}
    assert load_rows(ultrafeedback_dir, select=Selection(split="test_prefs")).rows[0]["chosen"] == " It is 100."
    with pytest.raises(DataValidationError) as caught:
        load_rows(ultrafeedback_dir)  # the default split, train, is not there
    assert [str(e) for e in caught.value.errors] == [
        f"{ultrafeedback_dir}:0: -: data.split: no split 'train'; the splits are test_prefs, train_gen, train_prefs"]
    with pytest.raises(DataValidationError, match="data.subset: no subset 'x': a save_to_disk directory has no"):
        load_rows(ultrafeedback_dir, select=Selection(split="train_prefs", subset="x"))


def test_a_single_file_has_only_the_train_split(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    assert len(load_rows(path).rows) == 1
    with pytest.raises(DataValidationError) as caught:
        load_rows(path, select=Selection(split="test"))
    assert str(caught.value.errors[0]) == (
        f"{path}:0: -: data.split: no split 'test': a single file holds one split, 'train' (named splits need a "
        "save_to_disk directory or a hub id)")
    with pytest.raises(DataValidationError, match=r"data.subset: no subset 'en': a single file has no subsets"):
        load_rows(path, select=Selection(subset="en"))


def test_a_saved_single_dataset_is_train_or_the_split_it_was_loaded_as(tmp_path):
    rows = [{"prompt": "P"}]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "plain")
    datasets.Dataset.from_list(rows, split=datasets.NamedSplit("validation")).save_to_disk(tmp_path / "named")
    assert load_rows(tmp_path / "plain").rows == rows
    assert load_rows(tmp_path / "named", select=Selection(split="validation")).rows == rows
    assert load_rows(tmp_path / "named").rows == rows  # the default still reads it
    with pytest.raises(DataValidationError, match="no split 'test': a saved single Dataset holds one split, "
                                                  "'train' or 'validation'"):
        load_rows(tmp_path / "named", select=Selection(split="test"))


def test_a_dataset_repository_directory_has_splits_and_subsets(tmp_path, monkeypatch):
    """The layout of a dataset downloaded from the hub: files named by split, subsets (configs) in README."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    for subset, split, prompts in (("en", "train", ["a", "b"]), ("en", "test", ["c"]), ("fr", "train", ["d"])):
        (repo / subset).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"prompt": prompts}), repo / subset / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {c}/{s}-*.parquet\n"
                                                         for s in splits)
        for c, splits in (("en", ("train", "test")), ("fr", ("train",)))) + "---\n")
    assert load_rows(repo, select=Selection(split="test", subset="en")).rows == [{"prompt": "c"}]
    assert load_rows(repo, select=Selection(subset="fr")).rows == [{"prompt": "d"}]
    with pytest.raises(DataValidationError, match="data.subset: Config name is missing. Please pick one among the "
                                                  r"available configs: \['en', 'fr'\]"):
        load_rows(repo)
    with pytest.raises(DataValidationError, match=r"data.split: Unknown split \"dev\". Should be one of \['train', "
                                                  r"'test'\]"):
        load_rows(repo, select=Selection(split="dev", subset="en"))


def test_data_check_takes_split_and_subset(ultrafeedback_dir):
    out = io.StringIO()
    assert run_data_check(str(ultrafeedback_dir), split="train_gen", out=out) == 0
    assert out.getvalue().splitlines()[:3] == [f"source: {ultrafeedback_dir} (split train_gen)", "format: messages",
                                               "rows: 5"]
    out = io.StringIO()
    assert run_data_check(str(ultrafeedback_dir), split="valid", out=out) == 2
    assert out.getvalue() == (f"{ultrafeedback_dir}:0: -: --split: no split 'valid'; the splits are test_prefs, "
                              "train_gen, train_prefs\n")


@pytest.mark.parametrize("overrides, message", [
    (["data.eval_split=test", "data.eval_file=e.jsonl"], "data.eval_split: set either data.eval_split or data.eval_fi"),
    (["data.eval_split=test", "data.eval_fraction=0.1"], "data.eval_split: set either data.eval_split or data.eval_f"),
    (["data.split=a", "data.eval_split=a"], "data.eval_split: is data.split ('a'); held-out pairs must come from"),
    (["data.split="], "data.split: must not be empty"),
])
def test_config_checks(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_eval_split_holds_out_that_split_of_the_training_source(ultrafeedback_dir):
    from rayalign.train import split_eval

    config = load_config(None, [f"data.train_file={ultrafeedback_dir}", "data.split=train_prefs",
                                "data.eval_split=test_prefs"])
    inputs = StageInputs.from_config(config)
    assert (inputs.split, inputs.eval_split, inputs.subset) == ("train_prefs", "test_prefs", None)
    assert StageInputs(**inputs.to_dict()) == inputs  # through Ray Train's train_loop_config and back
    rows = load_rows(ultrafeedback_dir, select=inputs.selection()).rows
    train, held = split_eval(rows, config, tokenizer=None, kind="pairs", inputs=inputs)
    assert train == rows and [r["chosen"] for r in held] == [" It is 100.", " It is 102.", " It is 104."]
    wrong = StageInputs(train_file=str(ultrafeedback_dir), split="train_prefs", eval_split="dev")
    with pytest.raises(DataValidationError, match="data.eval_split: no split 'dev'"):
        split_eval(rows, config, tokenizer=None, kind="pairs", inputs=wrong)


def test_loop_prompts_from_splits_keep_messages_and_ids(ultrafeedback_dir, tmp_path):
    from rayalign.stages import iteration_frame, plan_prompts
    from rayalign.templating import prompt_values

    base = [f"data.prompts_file={ultrafeedback_dir}", "loop.iterations=2", "loop.prompts_per_iteration=2",
            "eval.prompts=1"]
    sets, held = plan_prompts(load_config(None, [*base, "data.prompts_split=train_gen"]))
    assert held == [[user("Question 100: what is 100 plus 100?")]]  # `messages` rows lose their assistant turn
    assert sets == [[[user(f"Question {i}: what is {i} plus {i}?")] for i in pair] for pair in ((101, 102), (103, 104))]
    frame = iteration_frame(sets[1], 2)
    assert list(frame.columns) == ["prompt_id", "prompt", "prompt_messages"]
    assert list(frame["prompt_id"]) == [2_000_000, 2_000_001]
    assert list(frame["prompt_messages"]) == [True, True] and json.loads(frame["prompt"][0]) == sets[1][0]
    assert prompt_values(frame) == sets[1]
    # planned again (a resume): the same prompts, so the same ids and per-prompt seeds
    assert iteration_frame(plan_prompts(load_config(None, [*base, "data.prompts_split=train_gen"]))[0][1], 2).equals(
        frame)
    # no data.prompts_split: data.split; pairs give their prompts
    sets, held = plan_prompts(load_config(None, [*base, "data.split=train_prefs"]))
    assert held == [[user("Question 0: what is 0 plus 0?")]]
    assert sets[1] == [[user("Question 3: what is 3 plus 3?")], [user("Question 4: what is 4 plus 4?")]]
    text = tmp_path / "prompts.jsonl"
    text.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    with pytest.raises(DataValidationError, match=r"data.prompts_split \(unset: data.split\): no split 'train_prefs': "
                                                  "a single file holds one split"):
        plan_prompts(load_config(None, [*base, f"data.prompts_file={text}", "data.split=train_prefs"]))
    sets, held = plan_prompts(load_config(None, [*base, f"data.prompts_file={text}", "data.split=train_prefs",
                                                 "data.prompts_split=train"]))
    assert (held, sets) == (["p0"], [["p1", "p2"], ["p3", "p4"]])
    assert list(iteration_frame(sets[0], 1).columns) == ["prompt_id", "prompt"]  # text prompts: as before
