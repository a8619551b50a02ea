"""The `rayalign` command line, run as a user runs it: a subprocess, exit codes, printed output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def rayalign(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rayalign.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_show_resolves_yaml_and_overrides():
    result = rayalign("show", "configs/quickstart.yaml", "loss.beta=0.05", "train.num_workers=2")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["loss"]["beta"] == 0.05 and shown["train"]["num_workers"] == 2
    assert shown["optim"]["lr"] == 5e-4  # from the YAML
    assert shown["sams"]["ratio"] == 0.5  # a dataclass default


def test_show_without_a_config_file():
    result = rayalign("show", "loss.type=ipo")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["loss"]["type"] == "ipo"


def test_show_rejects_unknown_key_with_suggestion_and_no_traceback():
    result = rayalign("show", "configs/quickstart.yaml", "loss.bta=0.1")
    assert result.returncode == 2
    assert "loss.bta: unknown config key; did you mean loss.beta?" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_value_fails_naming_the_key():
    result = rayalign("show", "train.global_batch_size=30", "train.num_workers=4")
    assert result.returncode == 2 and "train.global_batch_size" in result.stderr


def test_make_tiny_model_command(tmp_path):
    result = rayalign("make-tiny-model", str(tmp_path / "m"), "--layers", "1", "--hidden", "64", "--heads", "2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


def test_readme_quickstart_runs(tmp_path):
    """The README's main command (`rayalign run configs/quickstart.yaml`), as is, into a known run dir."""
    readme = (REPO / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    assert "rayalign run configs/quickstart.yaml" in makefile and "torch==2.13.0" in makefile
    run_dir = tmp_path / "run"
    result = rayalign("run", "configs/quickstart.yaml", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["dir"] == str(run_dir)
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 24  # 128 pairs / 16 per step x 3 epochs
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s"):
        assert key in steps[0], key
    assert steps[-1]["loss"] < steps[0]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["held_out_reward_accuracy"] > 0.5
    assert (run_dir / "final" / "config.json").is_file() and (run_dir / "final" / "tokenizer.json").is_file()


def test_run_without_run_dir_makes_a_timestamped_one(tmp_path):
    result = rayalign("run", str(REPO / "configs" / "quickstart.yaml"), "train.max_steps=1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "final").is_dir()
