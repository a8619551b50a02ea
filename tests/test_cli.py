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
    assert shown["optim"]["lr"] == 2e-4  # from the YAML
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


def test_readme_quickstart_runs_reduced(quickstart_run):
    """The README's main command (`rayalign run configs/quickstart.yaml`) with 2 SPA iterations, not 3."""
    readme = (REPO / "README.md").read_text()
    assert "make quickstart" in readme and "make test" in readme
    makefile = (REPO / "Makefile").read_text()
    assert "rayalign run configs/quickstart.yaml" in makefile and "torch==2.13.0" in makefile
    run_dir, result = quickstart_run.run_dir, quickstart_run.result
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["dir"] == str(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for key in ("iteration", "win_rate_vs_sft", "win_rate_vs_prev", "gold_reward_mean", "judge_accuracy",
                "kl_to_ref", "pairs", "seconds"):
        assert all(key in r for r in records), key
    assert all(r["win_rate_vs_sft"] > 0.5 for r in records), records
    # rising: each self-judged iteration beats its predecessor on the same prompts, and the SFT baseline more
    assert all(r["win_rate_vs_prev"] > 0.5 for r in records[1:]), records
    assert records[-1]["win_rate_vs_sft"] > records[0]["win_rate_vs_sft"], records
    assert all(r["judge_accuracy"] > 0.5 for r in records[1:]), records
    assert records[0]["judge_accuracy"] is None  # iteration 0 trains on gold labels
    # per-stage seconds (issue 15): every iteration's training and evaluation, the sampling pass from iteration 1
    stages = ("time/prepare", "time/train_start", "time/train", "time/save", "time/evaluate")
    assert all(r[key] >= 0 for r in records for key in stages), records
    assert all(r["time/train"] > 0 and r["time/evaluate"] > 0 for r in records), records
    sampling = ("time/sample_pass", "time/generate", "time/judge")
    assert all(r[key] > 0 for r in records[1:] for key in sampling) and not any(k in records[0] for k in sampling)
    # the generator and the judge started in the first (pi_SFT's) pass; the iterations' passes start no model
    assert all(r["time/actor_start"] == 0 for r in records[1:]), records
    # generate/judge.persistent: one generator and one judge for the four passes, later weights pushed in memory
    for kind in ("generator", "judge"):
        assert f"{kind}: 1 engine(s) started for the run; 0 weight load(s) from files" in result.stdout, \
            result.stdout[-4000:]
    # iterations 1 and 2 take the reference log-probs from the judge's pass: no second scoring pass
    assert result.stdout.count("from the data (the judge's pass): no scoring pass") == 2, result.stdout[-4000:]
    for name in ("report.md", "plots/iterations.png", "plots/training.png", "plots/stage_times.png",
                 "iter-2/train/final/config.json",
                 "iter-1/samples.parquet", "iter-1/judged.parquet", "eval/sft.parquet"):
        assert (run_dir / name).exists(), name
    assert "| iteration |" in (run_dir / "report.md").read_text()
