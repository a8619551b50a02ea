"""`run.loggers`: TensorBoard, W&B and MLflow get the same metric names, the resolved config and the plots.

Offline only: W&B in `mode="offline"` under tmp_path (its run file is read back record by record: W&B's offline
store is a LevelDB-style log of protobuf `Record`s, parsed by `wandb_records` below, since `wandb.Api` needs
the server), MLflow in a file store under tmp_path (read back with `MlflowClient`), TensorBoard with its
`EventAccumulator`. The training stage is the real `Worker` stepping under Ray Train's local mode; the loop's
tracker run gets the real report's plots.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest

from rayalign.config import ConfigError
from rayalign.config_loader import config_to_dict, load_config
from rayalign.tracking import Trackers, TrackingSettings, check_loggers, numbers
from tests.test_load_options import local_loop_config, run_locally

ALL = "run.loggers=[tensorboard,wandb,mlflow]"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline into tmp_path/wandb-dir, MLflow's default store, no stray tracking environment."""
    for name in ("MLFLOW_TRACKING_URI", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path


def wandb_records(run_dir: Path) -> list:
    """Every protobuf `Record` of the one offline W&B run under `run_dir` (its `run-ID.wandb` file: a 7-byte
    ':W&B' header, then 32 KiB blocks of records, each `<crc32:4><length:2><type:1>` + data, split across
    blocks as FIRST/MIDDLE/LAST pieces, LevelDB's log format)."""
    from wandb.proto.wandb_internal_pb2 import Record

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", header
    while pos + header <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + header])
        if left < header or kind == 0:  # the zero-filled tail of a block
            pos += left
            continue
        pending, pos = pending + data[pos + header:pos + header + length], pos + header + length
        if kind in (1, 4):  # FULL or LAST
            records.append(Record.FromString(pending))
            pending = b""
    return records


def wandb_history(run_dir: Path) -> dict[int, dict[str, str]]:
    """{step: {metric: JSON value}} of the offline W&B run under `run_dir` (W&B's own `_...` keys left out)."""
    history = {}
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def wandb_config(run_dir: Path) -> dict:
    config = {}
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        for item in record.config.update if kind == "config" else ():
            config[item.key] = json.loads(item.value_json)
    return config


def mlflow_runs(tmp_path: Path, uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("rayalign")
    return client, {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_settings_resolve_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    config = load_config(None, [ALL, "run.project=p"])
    settings = TrackingSettings.resolve(config, tmp_path / "run")
    assert settings.mlflow_uri == (tmp_path / "run" / "mlruns").as_uri()
    assert (settings.wandb_mode, settings.wandb_dir, settings.project) == ("offline", str(tmp_path / "run"), "p")
    stage = settings.stage("iter-1/train", tmp_path / "run" / "iter-1" / "train")
    assert (stage.group, stage.name) == ("run", "run/iter-1/train")
    assert TrackingSettings.from_dict(stage.to_dict()) == stage  # what travels to the workers
    relative = load_config(None, [ALL, "run.tracking_uri=somewhere/mlruns"])
    monkeypatch.chdir(tmp_path)
    assert TrackingSettings.resolve(relative, "r").mlflow_uri == (tmp_path / "somewhere" / "mlruns").as_uri()
    server = load_config(None, [ALL, "run.tracking_uri=http://127.0.0.1:5000"])
    assert TrackingSettings.resolve(server, "r").mlflow_uri == "http://127.0.0.1:5000"
    assert numbers({"step": 3, "iteration": 1, "loss": 0.5, "pairs": 4, "win_rate_vs_sft": None}) == {
        "loss": 0.5, "pairs": 4.0}


@pytest.mark.parametrize("override, message", [
    ("run.loggers=[wandb,tensorbord]", "run.loggers: must be one of tensorboard, wandb, mlflow; got 'tensorbord' "
                                       "(did you mean tensorboard?)"),
    ("run.loggers=[mlflow,mlflow]", "run.loggers: lists a logger twice"),
])
def test_bad_loggers_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_a_missing_package_is_a_config_error_before_anything_runs(logger, tmp_path, capsys, monkeypatch):
    from rayalign.cli import main

    monkeypatch.setitem(sys.modules, logger, None)  # `import wandb` / `import mlflow` now fails
    with pytest.raises(ImportError):
        __import__(logger)
    with pytest.raises(ConfigError, match=rf"run.loggers: {logger} needs the {logger} package, which is not "
                                          r"installed \(pip install 'rayalign\[tracking\]'\)"):
        check_loggers(("tensorboard", logger))
    code = main(["train", "data.train_file=unused.jsonl", f"run.dir={tmp_path / 'r'}", f"run.loggers=[{logger}]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"run.loggers: {logger} needs the {logger} package" in err[0]
    assert not (tmp_path / "r").exists()


def test_a_training_stage_logs_the_same_metrics_and_config_everywhere(offline, tmp_path, tiny_model_dir):
    """The real Worker trains 2 steps (ref.cache=false, eval every step) under Ray Train's local mode."""
    from rayalign.metrics_log import read_jsonl
    from rayalign.train_loop import train_fn_per_worker

    run_dir = tmp_path / "run"
    config = load_config(None, [f"model.policy={tiny_model_dir}", "ref.cache=false", "train.global_batch_size=2",
                                "train.num_workers=1", "train.eval_every=1", f"run.dir={run_dir}", ALL])
    loop_config = local_loop_config(config, str(tiny_model_dir), tmp_path)
    loop_config.update(eval_path=loop_config["train_path"],
                       tracking=TrackingSettings.resolve(config, run_dir).stage("iter-0/train", run_dir).to_dict())
    run_locally(train_fn_per_worker, loop_config)

    steps = read_jsonl(run_dir / "metrics.jsonl")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert [s["step"] for s in steps] == [1, 2] and "eval/loss" in steps[0] and final["step"] == 2
    expected = {s["step"]: numbers(s) for s in steps}
    expected[2] |= numbers(final)  # the final evaluation is logged at the last step too
    names = set().union(*expected.values())
    assert {"loss", "rewards/accuracies", "rewards/margins", "eval/loss", "grad_norm", "lr"} <= names

    history = wandb_history(tmp_path / "wandb-dir")
    assert {step: set(values) for step, values in history.items()} == {s: set(m) for s, m in expected.items()}
    for step, values in expected.items():
        for name, value in values.items():
            assert json.loads(history[step][name]) == pytest.approx(value, rel=1e-6), (step, name)
    assert wandb_config(tmp_path / "wandb-dir")["loss"]["beta"] == config.loss.beta

    client, runs = mlflow_runs(tmp_path, (run_dir / "mlruns").as_uri())
    run = runs["run/iter-0/train"]
    assert run.info.status == "FINISHED" and run.data.tags["rayalign.group"] == "run"
    for name in names:
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == pytest.approx({s: v[name] for s, v in expected.items() if name in v}), name
    assert run.data.params["loss.beta"] == str(config.loss.beta)
    assert run.data.params["model.policy"] == str(tiny_model_dir)
    assert "config.yaml" in [a.path for a in client.list_artifacts(run.info.run_id)]

    scalars = tensorboard_scalars(run_dir / "tb")
    assert set(scalars) == names
    assert scalars["loss"] == [(s["step"], pytest.approx(s["loss"])) for s in steps]


def test_the_loop_run_logs_its_records_and_the_report_plots(offline, tmp_path):
    """The loop's tracker run (`rayalign.loop.open_trackers`), fed records as `_finish_record` does, then the
    plots the real `write_report` draws from them."""
    from rayalign.loop import _append_metrics, open_trackers
    from rayalign.report import write_report

    run_dir = tmp_path / "loop"
    config = load_config(None, [f"run.dir={run_dir}", ALL])
    records = [{"iteration": i, "pairs": 8, "win_rate_vs_sft": 0.5 + 0.1 * i, "kl_to_ref": 0.1 * i,
                "judge_accuracy": None if i == 0 else 0.7, "train_loss": 0.69 - 0.1 * i, "train_margin": 0.1,
                "seconds": 1.0} for i in range(2)]
    for i in range(2):
        log = run_dir / f"iter-{i}" / "train" / "metrics.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.1 * s}) + "\n"
                               for s in (1, 2)))
    trackers = open_trackers(config, run_dir)
    for record in records:
        _append_metrics(run_dir, record)
        trackers.log(record, step=record["iteration"])
    write_report(run_dir)
    plots = sorted((run_dir / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["iterations.png", "stage_times.png", "training.png"]
    trackers.log_images(plots, step=1)
    trackers.close()

    history = wandb_history(tmp_path / "wandb-dir")
    assert json.loads(history[1]["win_rate_vs_sft"]) == pytest.approx(0.6) and "judge_accuracy" not in history[0]
    assert json.loads(history[1]["plots/training/path"]).endswith(".png")
    assert len(list((tmp_path / "wandb-dir").glob("wandb/offline-run-*/files/media/images/plots/*.png"))) == 3
    client, runs = mlflow_runs(tmp_path, (run_dir / "mlruns").as_uri())
    run = runs["loop"]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "kl_to_ref")] == pytest.approx([0.0, 0.1])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "plots")) == [
        "plots/iterations.png", "plots/stage_times.png", "plots/training.png"]
    assert tensorboard_scalars(run_dir / "tb")["win_rate_vs_sft"] == [(0, 0.5), (1, pytest.approx(0.6))]


def test_tensorboard_alone_is_the_default_and_needs_no_tracking_package(tmp_path, monkeypatch):
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)
    config = load_config(None, [f"run.dir={tmp_path}"])
    assert config.run.loggers == ("tensorboard",)
    check_loggers(config.run.loggers)
    trackers = Trackers(TrackingSettings.resolve(config, tmp_path), tb_dir=tmp_path / "tb",
                        config=config_to_dict(config))
    trackers.log({"step": 1, "loss": 0.25}, step=1)
    trackers.close()
    assert tensorboard_scalars(tmp_path / "tb") == {"loss": [(1, 0.25)]}
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlruns").exists()


def test_where_a_run_is_logged_may_change_on_resume():
    from rayalign.run_dir import config_changes

    old = load_config(None, [])
    new = load_config(None, [ALL, "run.project=other", "run.tracking_uri=http://127.0.0.1:5000"])
    assert config_changes(old, new) == []
    assert config_changes(old, load_config(None, ["loss.beta=0.2"])) == ["loss.beta: 0.1 -> 0.2"]


def test_wandb_and_mlflow_are_imported_only_when_chosen():
    import subprocess

    code = ("import sys, rayalign.cli, rayalign.run_dir, rayalign.tracking, rayalign.metrics_log, rayalign.arch\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow'))))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == ""
