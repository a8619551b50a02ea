"""Ordinary mistakes and stage failures end in one line and a documented exit code, never a traceback.

User mistakes (exit 2) are found before any work: a model path that does not exist, an uncached hub id
offline, an unknown data.format. Runtime failures (exit 1) name the stage and the exception the Ray Data
actor or the Ray Train worker itself raised, unwrapped from Ray's wrappers (real Ray, real actors here).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from rayalign.cli import main
from rayalign.errors import EXIT_FAILURE, EXIT_USAGE, StageFailed, report

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    from rayalign.tasks.sentiment import gold_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(16, seed=0)))
    return path


@pytest.mark.parametrize("command", ["train", "run", "generate"])
def test_a_missing_model_path_names_the_key(tmp_path, capsys, pairs_file, command):
    code, err = run_cli(capsys, command, f"data.train_file={pairs_file}", f"run.dir={tmp_path / 'r'}",
                        f"model.policy={tmp_path / 'no-such-model'}")
    line = one_line(err)
    assert code == EXIT_USAGE and "model.policy" in line and "does not exist" in line
    assert not (tmp_path / "r").exists()


def test_a_mistyped_hub_id_offline_says_what_it_is_not(tmp_path, capsys, pairs_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "train", f"data.train_file={pairs_file}", f"run.dir={tmp_path / 'r'}",
                        "model.policy=gpt2-tpyo/not-a-model")
    line = one_line(err)
    assert code == EXIT_USAGE and "model.policy" in line and "'gpt2-tpyo/not-a-model'" in line
    assert "neither an existing local path nor a hub id in the local cache" in line


def test_loading_a_mistyped_hub_id_raises_a_one_line_model_error(monkeypatch):
    from rayalign.models import ModelNotFoundError, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="'gpt2-tpyo' is neither an existing local path") as caught:
        load_tokenizer("gpt2-tpyo")
    assert report(caught.value, "rayalign train") == (
        "rayalign: model not found: 'gpt2-tpyo' is neither an existing local path nor a hub id in the local cache "
        "(HF_HUB_OFFLINE=1); check the spelling", EXIT_USAGE)


def test_an_unknown_data_format_is_refused_at_config_time(capsys):
    code, err = run_cli(capsys, "show", "data.format=jsonl")
    line = one_line(err)
    assert code == EXIT_USAGE and line.startswith("rayalign: config error: data.format: must be one of explicit")


def test_show_and_its_errors_never_import_ray():
    import subprocess
    import sys

    code = ("import sys; from rayalign.cli import main; "
            "codes = (main(['show', 'data.format=explicit']), main(['show', 'data.format=nope'])); "
            "print(codes, sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip().splitlines()[-1] == "(0, 2) []", result.stdout


def test_a_failed_training_stage_of_the_loop_is_one_line_exit_1():
    line, code = report(StageFailed("train", "iteration 2: training in /r failed"), "rayalign run")
    assert (line, code) == ("rayalign: stage train failed: iteration 2: training in /r failed", EXIT_FAILURE)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    from rayalign.ray_session import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray()  # joins the suite's shared head (RAY_ADDRESS), else a local Ray
    yield
    if started:
        ray.shutdown()


def _broken_copy(model: Path, dest: Path, name: str, text: str) -> Path:
    shutil.copytree(model, dest)
    (dest / name).write_text(text)
    return dest


@pytest.mark.slow
def test_an_exception_in_a_ray_data_actor_names_the_stage_and_the_original_error(
        tmp_path, capsys, tiny_model_dir, local_ray):
    # config.json that is not JSON: the driver's checks pass (it exists), the Judge actor's load fails
    broken = _broken_copy(Path(tiny_model_dir), tmp_path / "broken", "config.json", "{not json")
    samples = tmp_path / "samples.parquet"
    pd.DataFrame({"prompt_id": [0, 0], "sample_index": [0, 1], "prompt": ["Hi", "Hi"],
                  "text": [" a", " b"]}).to_parquet(samples)
    code, err = run_cli(capsys, "judge", f"model.policy={tiny_model_dir}", f"model.reference={broken}",
                        f"run.dir={tmp_path / 'r'}", "--samples", str(samples))
    line = err.strip().splitlines()[-1]
    assert code == EXIT_FAILURE, err
    assert line.startswith("rayalign: stage judge failed: ") and "config.json" in line, line
    assert "UserCodeException" not in line and "RayTaskError" not in line, line


@pytest.mark.slow
def test_a_ray_train_worker_exception_stops_the_loop_with_the_workers_message(
        tmp_path, capsys, tiny_model_dir, pairs_file, local_ray):
    from rayalign.config_loader import load_config
    from rayalign.loop import train_iteration
    from rayalign.stage_storage import StageStorage

    # weights that are not safetensors: the driver (tokenizer, reference scoring) is fine, the worker is not
    broken = _broken_copy(Path(tiny_model_dir), tmp_path / "broken", "model.safetensors", "garbage")
    config = load_config(None, [f"run.dir={tmp_path / 'r'}", "train.num_workers=1", "train.max_failures=0",
                                "train.global_batch_size=4", "data.max_completion_length=16"])
    with pytest.raises(StageFailed) as caught:
        train_iteration(config, tmp_path / "r" / "iter-0" / "train", policy=str(broken),
                        reference=str(tiny_model_dir), data=str(pairs_file), epochs=1, iteration=0,
                        storage=StageStorage(config))
    err = capsys.readouterr().err  # (in-process Ray also logs here; the rayalign lines are what a user reads)
    failed = [line for line in err.splitlines() if line.startswith("rayalign train: error: training failed: ")]
    assert len(failed) == 1, err
    assert "WorkerGroupError" not in failed[0] and "Error Snippet" not in failed[0], failed[0]
    assert "safetensors" in failed[0].lower() or "header" in failed[0].lower(), failed[0]
    line, code = report(caught.value, "rayalign run")
    assert code == EXIT_FAILURE and line.startswith("rayalign: stage train failed: iteration 0: training in ")


def test_bad_data_rows_give_the_first_row_and_how_to_list_them_all():
    from rayalign.data.errors import DataValidationError, RowError
    from rayalign.errors import report

    rows = [RowError("pairs.jsonl", 1, "rejected", "missing field"), RowError("pairs.jsonl", 3, "prompt", "must be a "
            "string, got int"), RowError("pairs.jsonl", 4, "-", "not valid JSON")]
    line, code = report(DataValidationError(rows), "train")
    assert code == 2 and "\n" not in line
    assert line == ("pairs.jsonl:1: rejected: missing field (and 2 more: `rayalign data check pairs.jsonl` lists "
                    "them)")
    assert report(DataValidationError(rows[:1]), "train") == ("pairs.jsonl:1: rejected: missing field", 2)
