"""`--resume` with `run.storage` never deletes local results (`rayalign.storage_resume`), on a local-path storage.

Two situations: a storage holding no run (mistyped, or added to a run that lived in run.dir) while run.dir
holds a finished stage is refused with nothing changed; a stored run that lacks (or holds differently) what
run.dir has gets those local files moved to RUN_DIR.local-<timestamp>, and run.dir mirrors storage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rayalign.config import Config, ConfigError
from rayalign.storage import RunStorage
from rayalign.storage_resume import start_run


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _config(run_dir: Path, storage: Path) -> Config:
    config = Config()
    return dataclasses.replace(config, run=dataclasses.replace(config.run, dir=str(run_dir), storage=str(storage)))


LOCAL_RUN = {"config.yaml": "loss: {beta: 0.1}\n", "data/seed_pairs.jsonl": "{}\n", "sft/config.json": "{}",
             "iter-0/train/final/model.safetensors": "weights", "iter-0/train/metrics.jsonl": "{}\n",
             "iter-0/train/checkpoints/step-2/model.safetensors": "ckpt", "eval/iter-0.parquet": "rows"}


@pytest.mark.parametrize("storage_state", ["empty", "missing"])
def test_resume_refuses_a_storage_without_the_run_and_changes_nothing(tmp_path, storage_state):
    run = tmp_path / "run"
    _write(run, LOCAL_RUN)
    storage = tmp_path / "mistyped-bucket"
    if storage_state == "empty":
        storage.mkdir()
    with pytest.raises(ConfigError) as refused:
        start_run(_config(run, storage), resume=True)
    message = str(refused.value)
    assert "\n" not in message and str(storage) in message and str(run) in message, message
    assert "holds no run" in message and "iter-0/train/final" in message, message
    assert _files(run) == LOCAL_RUN  # final/ and everything else untouched
    assert not storage.exists() or not any(storage.iterdir())  # nor was anything published
    assert not list(tmp_path.glob("run.local-*"))


def test_resume_moves_aside_what_the_stored_run_lacks(tmp_path, capsys):
    run = tmp_path / "run"
    storage = tmp_path / "storage"
    _write(run, {k: v for k, v in LOCAL_RUN.items() if not k.startswith("iter-0/train/final")})
    store = RunStorage(storage, run)
    store.publish(run / "config.yaml", run / "data", run / "sft", run / "eval" / "iter-0.parquet")
    # run.dir is ahead of storage (a kill before the stage's publish), and one plain file differs
    _write(run, {"iter-0/train/final/model.safetensors": "weights", "iter-0/train/final/config.json": "{}",
                 "eval/iter-0.parquet": "rows, rewritten locally",
                 "config.1.yaml": "loss: {beta: 0.2}\n"})  # a kept earlier config (rayalign.run_dir): local only
    before = _files(run)

    start_run(_config(run, storage), resume=True)
    asides = list(tmp_path.glob("run.local-*"))
    assert len(asides) == 1
    aside = asides[0]
    assert _files(aside) == {"eval/iter-0.parquet": "rows, rewritten locally", "iter-0/train/metrics.jsonl": "{}\n",
                             "iter-0/train/final/config.json": "{}", "iter-0/train/final/model.safetensors": "weights"}
    out = capsys.readouterr().out
    assert str(aside) in out and "iter-0/train/final" in out and str(storage) in out, out
    assert not (run / "iter-0" / "train" / "final").exists()  # storage is the truth: that stage is redone
    assert (run / "eval" / "iter-0.parquet").read_text() == "rows"
    now = {k: v for k, v in _files(run).items() if "_COMMITTED" not in k}
    assert now == {k: v for k, v in before.items() if "_COMMITTED" not in k and k not in _files(aside)} | {
        "eval/iter-0.parquet": "rows"}  # nothing lost: every local file is in run.dir or in the aside copy
    assert (run / "iter-0" / "train" / "checkpoints" / "step-2" / "model.safetensors").read_text() == "ckpt"
    assert (run / "config.1.yaml").read_text() == "loss: {beta: 0.2}\n"  # the run's history stays in place

    capsys.readouterr()
    start_run(_config(run, storage), resume=True)  # now the two agree: nothing more is moved
    assert list(tmp_path.glob("run.local-*")) == [aside] and "moved" not in capsys.readouterr().out


def test_resume_moves_aside_a_unit_committed_differently(tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    storage = tmp_path / "storage"
    _write(other, {"config.yaml": "x", "sft/config.json": '{"stored": 1}'})
    RunStorage(storage, other).publish(other / "config.yaml", other / "sft")
    _write(run, {"config.yaml": "x", "sft/config.json": '{"local": 1}'})  # never published: no marker
    start_run(_config(run, storage), resume=True)
    (aside,) = tmp_path.glob("run.local-*")
    assert _files(aside) == {"sft/config.json": '{"local": 1}'}
    assert (run / "sft" / "config.json").read_text() == '{"stored": 1}'


def test_resume_on_an_empty_run_dir_just_mirrors(tmp_path):
    run, storage = tmp_path / "run", tmp_path / "storage"
    _write(run, LOCAL_RUN)
    store = RunStorage(storage, run)
    store.publish(run / "config.yaml", run / "data", run / "sft", run / "iter-0" / "train" / "final")
    fresh = tmp_path / "fresh"
    _write(fresh, {"config.yaml": LOCAL_RUN["config.yaml"]})
    start_run(_config(fresh, storage), resume=True)
    assert (fresh / "iter-0" / "train" / "final" / "model.safetensors").read_text() == "weights"
    assert not list(tmp_path.glob("fresh.local-*"))
