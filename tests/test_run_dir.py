"""A run directory's record: refused commands write nothing, --resume refuses changed settings, history kept.

Every command here is refused (or only prepares the directory) before any Ray or torch work, so the tests run
in-process through `rayalign.cli.main` in about a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from rayalign.cli import main
from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.run_dir import prepare_run_dir

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def tree_hash(root: Path) -> str:
    """Every path and file content under `root` (a change anywhere changes the hash)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def existing_run(tmp_path: Path, *markers: str) -> Path:
    """A run dir as the quickstart leaves it: its config.yaml plus the given marker files."""
    run_dir = tmp_path / "existing"
    prepare_run_dir(load_config(QUICKSTART, [f"run.dir={run_dir}"]))
    for marker in markers:
        (run_dir / marker).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / marker).write_text("{}\n")
    return run_dir


def refused(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("command", "marker", "message"), [
    ("run", "data/seed_pairs.jsonl", "already holds a run"),
    ("train", "checkpoints/step-2/trainer_state.json", "already has checkpoints"),
    ("tune", "tune/sweep.yaml", "already holds a sweep"),
    ("generate", "data/seed_pairs.jsonl", "holds a run"),
    ("judge", "final/config.json", "holds a training run"),
    ("eval", "tune/sweep.yaml", "holds a sweep"),
])
def test_a_refused_command_writes_nothing_into_the_run_dir(tmp_path, capsys, command, marker, message):
    run_dir = existing_run(tmp_path, marker)
    if command == "tune":  # the sweep file is the resolved config, as `rayalign tune` writes it
        (run_dir / marker).write_text((run_dir / "config.yaml").read_text())
    before = tree_hash(run_dir)
    err = refused(capsys, command, QUICKSTART, f"run.dir={run_dir}", "loss.beta=0.5")
    assert message in err
    assert tree_hash(run_dir) == before
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["beta"] == 0.1


@pytest.mark.parametrize("command", ["run", "train", "tune"])
def test_resume_with_changed_settings_is_refused_listing_them(tmp_path, capsys, command):
    run_dir = existing_run(tmp_path, "data/seed_pairs.jsonl")
    if command == "tune":
        (run_dir / "tune").mkdir()
        (run_dir / "tune" / "sweep.yaml").write_text((run_dir / "config.yaml").read_text())
    before = tree_hash(run_dir)
    err = refused(capsys, command, QUICKSTART, f"run.dir={run_dir}", "loss.beta=0.5", "train.seed=3", "--resume")
    assert "loss.beta" in err and "train.seed" in err
    if command != "tune":
        assert "loss.beta: 0.1 -> 0.5" in err and "--accept-changes" in err
    assert tree_hash(run_dir) == before


def test_accepted_changes_keep_the_earlier_config_as_a_numbered_version(tmp_path):
    run_dir = existing_run(tmp_path, "data/seed_pairs.jsonl")
    first = (run_dir / "config.yaml").read_text()
    changed = load_config(QUICKSTART, [f"run.dir={run_dir}", "loss.beta=0.5"])
    with pytest.raises(ConfigError, match="loss.beta: 0.1 -> 0.5"):
        prepare_run_dir(changed, command="run", resume=True)
    prepare_run_dir(changed, command="run", resume=True, accept_changes=True)
    assert (run_dir / "config.1.yaml").read_text() == first
    assert load_config(run_dir / "config.yaml").loss.beta == 0.5
    again = load_config(QUICKSTART, [f"run.dir={run_dir}", "loss.beta=0.7"])
    prepare_run_dir(again, command="run", resume=True, accept_changes=True)
    assert load_config(run_dir / "config.2.yaml").loss.beta == 0.5
    assert load_config(run_dir / "config.yaml").loss.beta == 0.7
    assert not list(run_dir.glob(".*tmp*"))


def test_resume_with_the_same_settings_changes_nothing(tmp_path, monkeypatch):
    run_dir = existing_run(tmp_path, "data/seed_pairs.jsonl")
    before = tree_hash(run_dir)
    monkeypatch.chdir(tmp_path)  # run.dir given relative this time: the same directory, the same run
    config = prepare_run_dir(load_config(QUICKSTART, ["run.dir=existing"]), command="run", resume=True)
    assert config.run.dir == str(run_dir)
    assert tree_hash(run_dir) == before


def test_a_fresh_run_dir_is_created_only_after_the_checks(tmp_path, capsys):
    run_dir = tmp_path / "new"
    err = refused(capsys, "train", QUICKSTART, f"run.dir={run_dir}", f"model.policy={tmp_path / 'no-such-model'}")
    assert "model.policy" in err and "does not exist" in err
    assert not run_dir.exists()


def test_stage_commands_in_one_dir_keep_each_config(tmp_path):
    out = tmp_path / "stages"
    prepare_run_dir(load_config(QUICKSTART, [f"run.dir={out}", "generate.seed=1"]), command="generate")
    prepare_run_dir(load_config(QUICKSTART, [f"run.dir={out}", "generate.seed=2"]), command="judge")
    assert load_config(out / "config.1.yaml").generate.seed == 1
    assert load_config(out / "config.yaml").generate.seed == 2


def test_resume_from_an_empty_run_dir_checks_the_stored_runs_settings(tmp_path):
    """--resume on another machine (an empty run.dir, the run in run.storage): the stored config.yaml is the
    record, so a changed setting is refused there too, writing nothing; accepted, the stored one is kept."""
    from rayalign.storage import RunStorage

    storage = tmp_path / "storage"
    first = prepare_run_dir(load_config(QUICKSTART, [f"run.dir={tmp_path / 'a'}", f"run.storage={storage}"]))
    RunStorage(storage, first.run.dir).publish(Path(first.run.dir) / "config.yaml")
    stored = (storage / "config.yaml").read_text()
    elsewhere = tmp_path / "b"
    changed = load_config(QUICKSTART, [f"run.dir={elsewhere}", f"run.storage={storage}", "loss.beta=0.5"])
    with pytest.raises(ConfigError, match="loss.beta: 0.1 -> 0.5"):
        prepare_run_dir(changed, command="run", resume=True)
    assert not elsewhere.exists()
    prepare_run_dir(changed, command="run", resume=True, accept_changes=True)
    assert (elsewhere / "config.1.yaml").read_text() == stored
    assert load_config(elsewhere / "config.yaml").loss.beta == 0.5
    third = tmp_path / "c"
    prepare_run_dir(load_config(QUICKSTART, [f"run.dir={third}", f"run.storage={storage}"]), command="run",
                    resume=True)  # only run.dir differs from the stored record: not a change
    assert sorted(p.name for p in third.iterdir()) == ["config.yaml"]
