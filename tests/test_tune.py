"""`rayalign tune`: the search-space rules (pure, no Ray) and one reduced `configs/tune_mallows.yaml` sweep.

The sweep is the shipped config with small overrides: 32 synthesized pairs, the tiny model built from them,
3 steps per trial, DPO vs MallowsPO-theta (2 trials, side by side). Its whole process group is SIGKILLed as
soon as both trials have trained to the end, before the driver writes any output (and usually before Tune
has recorded the second trial as finished), then `--resume` must restore the sweep, train nothing again,
rescore nothing, and write every output. One sweep covers the outputs and the resume because each trial
costs a TorchTrainer start (~20 s here); a trial interrupted mid-training continuing from its checkpoint
is `rayalign train --resume`, tested in tests/test_train_ray.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.tune_space import check_space, grid_size, parse_space, trial_config
from tests.conftest import REPO, own_ray_env
from tests.conftest import wait_for as _wait_for

CONFIG = "configs/tune_mallows.yaml"
TAG = "RAYALIGN_TEST_RUN_TAG"  # inherited by the sweep's Ray daemons and workers: finds leaked processes


def _space_error(space: dict, base_overrides=()) -> str:
    base = load_config(None, list(base_overrides))
    with pytest.raises(ConfigError) as info:
        check_space(base, parse_space(space))
    return str(info.value)


def test_the_shipped_sweep_is_the_papers_12_trial_grid():
    config = load_config(REPO / CONFIG)
    dims = parse_space(config.tune.space)
    assert [(d.key, d.kind) for d in dims] == [("loss.type", "grid"), ("loss.beta", "grid"), ("optim.lr", "grid")]
    assert grid_size(dims, config.tune.num_samples) == 12
    configs = check_space(config, dims)
    assert len(configs) == 12 and {c.loss.type for c in configs} == {"dpo", "mallows_theta"}
    assert sorted({c.optim.lr for c in configs}) == [5e-7, 1e-6]
    assert (config.tune.metric, config.tune.mode) == ("eval/rewards/accuracies", "max")


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs").glob("tune_*.yaml")))
def test_every_shipped_sweep_passes_the_checks_made_before_ray(path):
    from rayalign.tune import check_sweep, sweep_base

    config = load_config(REPO / "configs" / path, ["run.dir=unused"])
    dims = parse_space(config.tune.space)
    check_sweep(config, dims, check_space(sweep_base(config), dims))


def test_one_reference_pass_serves_dpo_and_mallows_trials():
    """The shipped grid (DPO and MallowsPO-theta; beta and lr do not change the reference) warms one entry, with
    the entropies MallowsPO-theta needs; a MallowsPO-phi with a fixed phi (no entropies) shares DPO's entry;
    another completion length is another entry."""
    from rayalign.loss_registry import needs_dispersion
    from rayalign.tune import sweep_base, warm_configs

    config = load_config(REPO / CONFIG, ["run.dir=unused"])
    warm = warm_configs(sweep_base(config), parse_space(config.tune.space))
    assert len(warm) == 1 and needs_dispersion(warm[0].loss)
    space = {"loss.type": {"grid": ["dpo", "mallows_phi"]}, "loss.mallows_phi": {"grid": [0.5]},
             "data.max_completion_length": {"grid": [32, 64]}}
    warm = warm_configs(sweep_base(config), parse_space(space))
    assert sorted(c.data.max_completion_length for c in warm) == [32, 64]
    assert not any(needs_dispersion(c.loss) for c in warm)


def test_a_trial_config_is_built_like_command_line_overrides():
    base = load_config(REPO / CONFIG)
    params = {"loss.type": "mallows_theta", "loss.beta": 0.05, "optim.lr": "1e-6"}  # YAML 1.1 leaves 1e-6 a string
    expected = load_config(REPO / CONFIG, ["loss.type=mallows_theta", "loss.beta=0.05", "optim.lr=1e-6"])
    assert trial_config(base, params) == expected


@pytest.mark.parametrize("space, message", [
    ({"loss.bta": {"grid": [0.1]}}, "loss.bta: unknown config key; did you mean loss.beta?"),
    ({"loss.beta": [0.1, 0.2]}, "tune.space.loss.beta: expected one of {grid | choice | uniform | loguniform"),
    ({"loss.beta": {"grid": [0.1], "choice": [0.2]}}, "tune.space.loss.beta: expected one of"),
    ({"loss.beta": {"range": [0.1, 0.2]}}, "tune.space.loss.beta: unknown search kind 'range'"),
    ({"loss.beta": {"grid": []}}, "tune.space.loss.beta: grid takes a non-empty list"),
    ({"optim.lr": {"uniform": [1e-6]}}, "tune.space.optim.lr: uniform takes [low, high], two numbers"),
    ({"optim.lr": {"uniform": [1e-5, 1e-6]}}, "with low < high"),
    ({"optim.lr": {"loguniform": [0, 1e-6]}}, "tune.space.optim.lr: loguniform takes [low, high] with 0 < low"),
    ({"run.dir": {"grid": ["a", "b"]}}, "tune.space.run.dir: run.dir is set by the sweep itself"),
    ({"loss.beta": {"grid": [0.1, -1]}}, "tune.space.loss.beta: grid value -1: loss.beta: must be > 0"),
    ({"loss.type": {"grid": ["dpo", "mallow"]}}, "tune.space.loss.type: grid value 'mallow': loss.type:"),
    ({"train.num_workers": {"choice": [1, "two"]}}, "tune.space.train.num_workers: choice value 'two'"),
    ({}, "tune.space: empty"),
])
def test_bad_spaces_fail_naming_the_key(space, message):
    assert message in _space_error(space)


def test_every_grid_combination_must_be_a_valid_config():
    # Each value alone is valid; SPA refinement on top of MallowsPO is not (it applies to dpo only).
    message = _space_error({"spa.refine": {"grid": [False, True]}, "loss.type": {"grid": ["dpo", "mallows_theta"]}})
    assert "tune.space: the combination spa.refine=True, loss.type='mallows_theta': spa.refine:" in message


def test_sweep_rules_are_checked_before_ray(tmp_path):
    """The CLI rejects a bad sweep with exit status 2 and a one-line message, without importing Ray."""
    cases = {("tune.metric=eval/rewards/acc",): "tune.metric: 'eval/rewards/acc' is not reported by training",
             ("data.eval_fraction=0",): "tune.metric: eval metrics need held-out pairs",
             ("tune.scheduler=asha", "train.eval_every=0"): "tune.scheduler: asha stops trials on intermediate",
             ("tune.space={data.train_file: {grid: [a, b]}}",): "tune.space.data.train_file: with model.policy empty"}
    code = ("import json, sys; from rayalign.cli import main\n"
            "for case in json.loads(sys.argv[2]):\n"
            "    print('exit', main(['tune', 'configs/tune_mallows.yaml', 'run.dir=' + sys.argv[1], *case]))\n"
            "print('ray imported:', 'ray' in sys.modules)\n")
    command = [sys.executable, "-c", code, str(tmp_path / "run"), json.dumps(list(cases))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.count("exit 2") == len(cases) and "ray imported: False" in result.stdout, result.stdout
    for message in cases.values():
        assert message in result.stderr, result.stderr


def test_ranked_puts_the_best_first_and_missing_metrics_last(tmp_path):
    from rayalign.tune_report import TrialRecord, ranked

    def trial(name, values):
        return TrialRecord(name, {}, "TERMINATED", tmp_path, tuple(enumerate(values)))

    trials = [trial("a", [0.5, 0.6]), trial("b", []), trial("c", [0.9, 0.7]), trial("d", [0.1, 0.8])]
    assert [t.name for t in ranked(trials, "max")] == ["d", "c", "a", "b"]
    assert [t.name for t in ranked(trials, "min")] == ["a", "c", "d", "b"]
    assert trials[2].best("max") == (0, 0.9) and math.isnan(trials[1].final)


# ----------------------------------------------------------------------------------------------- the sweep
REDUCED = ("data.eval_fraction=0.25", "data.max_completion_length=48", "optim.lr=1e-3", "optim.warmup_ratio=0",
           "train.global_batch_size=8", "train.eval_every=2", "train.save_every=2",
           "tune.space={loss.type: {grid: [dpo, mallows_theta]}}")


def _tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries TAG=tag (the sweep's driver, Ray daemons and workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and f"{TAG}={tag}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found



def _reap(tag: str) -> None:
    """Ray's daemons die with their driver; give them a moment, then SIGKILL any survivor of ours."""
    try:
        _wait_for(lambda: not _tagged_processes(tag), 30, "Ray processes to exit")
    except AssertionError:
        for pid in _tagged_processes(tag):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _tagged_processes(tag), 30, "killed Ray processes to exit")


def _run_until_trials_finish(command: list[str], env: dict, trials: Path, count: int) -> str:
    """Run the sweep in its own session; SIGKILL its process group once `count` trials have trained to the end
    (before Tune has recorded the last of them: it saves its state at most every 10 s)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env=env, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        _wait_for(lambda: len(list(trials.glob("*/final_metrics.json"))) == count or proc.poll() is not None, 600,
                  f"{count} trials to finish")
        assert proc.poll() is None, "".join(lines)[-4000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return "".join(lines)


def _stamp(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """(inode, mtime) per file: an atomic rewrite changes the inode, an in-place one the mtime."""
    return {str(p): ((s := p.stat()).st_ino, s.st_mtime_ns) for p in paths}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    from rayalign.tasks.sentiment import gold_pairs

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gold_pairs(32, seed=11)))
    return path


@pytest.mark.slow
def test_reduced_sweep_killed_and_resumed(pairs_file, tmp_path):
    run_dir, tag = tmp_path / "sweep", uuid.uuid4().hex
    tune_dir, trials = run_dir / "tune", run_dir / "tune" / "trials"
    command = [sys.executable, "-m", "rayalign.cli", "tune", CONFIG, f"run.dir={run_dir}",
               f"data.train_file={pairs_file}", *REDUCED]
    env = own_ray_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **{TAG: tag})  # a Ray of its own, tagged
    started = time.perf_counter()
    first_log = _run_until_trials_finish(command, env, trials, count=2)
    _reap(tag)
    killed_after = time.perf_counter() - started
    kept = [trial / name for trial in sorted(trials.iterdir())
            for name in ("config.yaml", "metrics.jsonl", "final_metrics.json", "final/model.safetensors")]
    cache = sorted((tune_dir / "ref_cache").glob("*.parquet"))
    before = _stamp(kept + cache)
    assert "Trial status:" in first_log, first_log[-3000:]  # Tune's progress table reaches our output
    # The driver scored the reference once, before any trial, while building the tiny model: with the
    # entropies MallowsPO needs, an entry the DPO trial reads too; each trial then read the cache.
    lines = first_log.splitlines()
    misses = [line for line in lines if "reference cache miss" in line]
    hits = [line for line in lines if "run_trial" in line and "reference cache hit" in line]
    assert len(cache) == 1 and len(misses) == 1 and not any("run_trial" in line for line in misses), misses
    assert len(hits) == 2 and {Path(h.split("hit: ")[1].split(" ")[0]) for h in hits} == set(cache), hits
    assert "rayalign tune: reference cache warm for 1 setting(s)" in first_log

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    total = time.perf_counter() - started
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-5000:]
    _reap(tag)
    assert f"resuming the sweep in {tune_dir / 'experiment'}: 2 finished trial(s) kept" in log, log[-5000:]
    assert "were prepared before" in log and "reference cache hit" not in log and "cache miss" not in log, log
    assert "starting 1 ddp worker" not in log, "--resume trained a finished trial again"
    assert _stamp(kept + cache) == before, "--resume touched a finished trial or rescored the reference"
    _check_outputs(tune_dir)
    print(f"sweep: killed after {killed_after:.0f} s, resumed and finished at {total:.0f} s")


def _check_outputs(tune_dir: Path) -> None:
    import csv

    import matplotlib.image

    rows = list(csv.DictReader((tune_dir / "results.csv").open()))
    metric = "eval/rewards/accuracies"
    assert sorted(r["loss.type"] for r in rows) == ["dpo", "mallows_theta"], rows
    for row in rows:
        assert row["status"] == "TERMINATED", row
        assert 0.0 <= float(row[f"final {metric}"]) <= 1.0 and 0.0 <= float(row[f"best {metric}"]) <= 1.0, row
        steps = [json.loads(line)["step"] for line in (Path(row["trial dir"]) / "metrics.jsonl").open()]
        assert steps == [1, 2, 3], steps  # 24 training pairs / 8 per step, once
    table = [line for line in (tune_dir / "results.md").read_text().splitlines() if line.startswith("| ")][1:]
    finals = [float(line.split("|")[4]) for line in table]
    assert len(finals) == 2 and finals == sorted(finals, reverse=True), table
    for name in ("final_metric.png", "learning_curves.png"):
        image = matplotlib.image.imread(tune_dir / name)
        assert (tune_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100, name
    best = max(rows, key=lambda r: float(r[f"final {metric}"]))
    trial = load_config(Path(best["trial dir"]) / "config.yaml")
    assert load_config(tune_dir / "best.yaml") == dataclasses.replace(
        trial, run=dataclasses.replace(trial.run, dir=None, storage=None))
    assert trial.model.policy == str(tune_dir / "tiny-model") and trial.ref.cache_dir == str(tune_dir / "ref_cache")
