"""`rayalign generate`, `judge` and `eval`, run as a user runs them, against the loop's own artifacts.

The stages give prompts the loop's ids (so the loop's per-prompt seeds): run by hand on the models of the
session's reduced quickstart (`quickstart_run`), each must reproduce what the loop wrote for the same
prompts. A few prompts keep this cheap: the embedded task's prompt lists are seeded prefixes, so the first 8
prompts of a smaller config are the loop's first 8. `eval` also runs with eval.reward_model (the reward
model's metrics beside the gold ones). The three commands share one Ray instance, started here, through
RAY_ADDRESS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO

FEW = ("loop.prompts_per_iteration=8", "eval.prompts=8")


def rayalign(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rayalign.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def ray_address():
    import ray

    from rayalign.ray_session import init_ray

    started = not ray.is_initialized()
    if started:
        init_ray()  # joins the suite's shared head (RAY_ADDRESS), else a local Ray
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_generate_judge_eval_reproduce_the_loop(quickstart_run, reward_model_dir, ray_address, tmp_path):
    assert quickstart_run.result.returncode == 0, quickstart_run.result.stderr[-3000:]
    base, out = quickstart_run.run_dir, tmp_path / "stages"
    common = ("configs/quickstart.yaml", *quickstart_run.overrides, *FEW, f"run.dir={out}")
    env = {"RAY_ADDRESS": ray_address}
    pi_0, sft = f"model.policy={base / 'iter-0/train/final'}", f"model.reference={base / 'sft'}"

    # generate: iteration 1's prompts with pi_0, as the loop sampled them (same ids, hence seeds).
    _ok(rayalign("generate", *common, pi_0, "--iteration", "1", env=env))
    ours = pd.read_parquet(out / "samples.parquet")
    loop = pd.read_parquet(base / "iter-1/samples.parquet")
    loop = loop[loop["prompt_id"].isin(ours["prompt_id"])].reset_index(drop=True)
    samples = yaml.safe_load((base / "config.yaml").read_text())["generate"]["num_samples"]
    # the loop's samples also have the judge's policy_logp (its pass judged them); the generate stage does not
    assert len(ours) == 8 * samples and list(ours.columns) == [c for c in loop.columns if c != "policy_logp"]
    for column in ("prompt_id", "sample_index", "prompt", "text", "finish_reason"):
        assert list(ours[column]) == list(loop[column]), column
    assert [list(t) for t in ours["token_ids"]] == [list(t) for t in loop["token_ids"]]
    assert ours["logp_sum"].tolist() == pytest.approx(loop["logp_sum"].tolist(), abs=1e-5)

    # judge: those samples, pi_0 vs pi_SFT -> the loop's pairs (the kept ones among these prompts).
    _ok(rayalign("judge", *common, pi_0, sft, "--samples", str(out / "samples.parquet"), env=env))
    judged = pd.read_parquet(out / "judged.parquet")
    loop_judged = pd.read_parquet(base / "iter-1/judged.parquet")
    loop_judged = loop_judged[loop_judged["prompt_id"].isin(ours["prompt_id"])].reset_index(drop=True)
    counts = json.loads((out / "judge_counts.json").read_text())
    assert counts["prompts"] == 8 and counts["pairs"] == len(judged) > 0
    for column in ("prompt_id", "chosen", "rejected", "chosen_index", "rejected_index"):
        assert list(judged[column]) == list(loop_judged[column]), column
    assert judged["margin"].tolist() == pytest.approx(loop_judged["margin"].tolist(), abs=1e-5)

    # eval: pi_2 against pi_SFT (the default baseline) on the held-out prompts -> the loop's numbers there; with
    # eval.reward_model, the reward model's metrics besides them.
    from rayalign.evaluate import compare, compare_rm, kl_to_sft
    from rayalign.reward_model import RewardModel

    shown = _ok(rayalign("eval", *common, f"model.policy={base / 'iter-2/train/final'}", sft,
                         f"eval.reward_model={reward_model_dir}", env=env))
    summary = json.loads((out / "eval/summary.json").read_text())
    assert json.loads(shown[shown.index("{"):]) == summary
    loop_eval, loop_sft = (pd.read_parquet(base / f"eval/{name}.parquet").head(8) for name in ("iter-2", "sft"))
    ours_eval = pd.read_parquet(out / "eval/policy.parquet")
    assert [list(t) for t in ours_eval["texts"]] == [list(t) for t in loop_eval["texts"]]
    expected = {"kl_to_sft": kl_to_sft(loop_eval), **compare(loop_eval, {"baseline": loop_sft})}
    assert summary["prompts"] == 8 and summary["baseline"] == str(base / "sft")
    assert {k: summary[k] for k in expected} == pytest.approx(expected, abs=1e-5)
    # the reward model scored both sides' samples (the baseline's too); its metrics are computed from them
    rm = RewardModel(str(reward_model_dir), key="eval.reward_model", max_length=64 + 48)
    baseline = pd.read_parquet(out / "eval/baseline.parquet")
    for frame in (ours_eval, baseline):
        scores = rm.score(list(frame["prompt"]), [list(t) for t in frame["texts"]])
        assert [v for r in frame["rm_rewards"] for v in r] == pytest.approx(scores.flatten().tolist(), abs=1e-4)
    expected = compare_rm(ours_eval, {"baseline": baseline})
    assert {k: summary[k] for k in expected} == pytest.approx(expected)
    assert summary["rm/baseline_reward_mean"] == pytest.approx(compare_rm(baseline, {})["rm/reward_mean"])
    assert 0.0 <= summary["rm/win_rate_vs_baseline"] <= 1.0


def test_stage_commands_reject_bad_input_naming_it(tmp_path, tiny_model_dir, capsys):
    """Errors surface before Ray starts: exit 2, one line naming the field or file, no traceback.

    One case runs as a subprocess (the real exit status); the others call the same `main` in-process,
    which is what `python -m rayalign.cli` returns, without paying an interpreter start each."""
    from rayalign.cli import main

    missing, one_each = tmp_path / "nope.parquet", tmp_path / "one.parquet"
    pd.DataFrame({"prompt_id": [0, 1], "sample_index": [0, 0], "prompt": ["a", "b"], "text": ["x", "y"]}) \
        .to_parquet(one_each)
    common = ("configs/quickstart.yaml", f"run.dir={tmp_path}")
    models = (f"model.policy={tiny_model_dir}", f"model.reference={tiny_model_dir}")
    result = rayalign("judge", *common, *models, "--samples", str(missing))
    assert result.returncode == 2 and f"--samples: {missing} does not exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    cases = {
        "same number (>= 2) of samples": ("judge", *common, *models, "--samples", str(one_each)),
        "model.policy: set it to the model to sample from": ("generate", *common),
        "--iteration: must be in 1..3": ("generate", *common, *models, "--iteration", "4"),
        f"model.policy: model path '{tmp_path}/absent' does not exist": ("eval", *common,
                                                                        f"model.policy={tmp_path}/absent"),
        f"model.policy: {tmp_path} holds no Hugging Face model (no config.json)": ("eval", *common,
                                                                                    f"model.policy={tmp_path}"),
    }
    for message, args in cases.items():
        assert main(list(args)) == 2, args
        assert message in capsys.readouterr().err, args
