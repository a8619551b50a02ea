"""The reward model: its math, its input, the fitted test model, judging with it, and evaluating with it.

No Ray here: the Judge actor class is called in-process on a batch, as Ray Data calls it. The fitted
reward model is the session's `reward_model_dir` (rayalign.tasks.reward_model, ~7 s).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from rayalign.config_checks import ConfigError


def test_bradley_terry_loss_hand_values():
    """-log sigma(c - r): margin 0 -> ln 2 = 0.693147; margin 2 -> ln(1 + e^-2) = 0.126928;
    margin -2 -> ln(1 + e^2) = 2.126928; margin -200 stays finite (= 200)."""
    from rayalign.core.reward_model import bradley_terry_loss

    loss = bradley_terry_loss(torch.tensor([1.0, 3.0, 0.0, -100.0], dtype=torch.float64),
                              torch.tensor([1.0, 1.0, 2.0, 100.0], dtype=torch.float64))
    assert loss.tolist() == pytest.approx([0.693147, 0.126928, 2.126928, 200.0], abs=1e-6)


def test_reward_model_judgment_is_best_vs_worst():
    from rayalign.core.reward_model import reward_model_judgment

    out = reward_model_judgment(torch.tensor([[0.5, 2.0, -1.0], [1.0, 1.0, 1.0], [3.0, -2.0, 3.0]]))
    assert out.chosen_index.tolist() == [1, 0, 0] and out.rejected_index.tolist() == [2, 0, 1]
    assert out.margin.tolist() == [3.0, 0.0, 5.0] and out.tied.tolist() == [False, True, False]


def test_reward_text_string_and_conversation(tiny_model_dir):
    from rayalign.models import load_tokenizer
    from rayalign.reward_model import reward_text

    tok = load_tokenizer(tiny_model_dir)
    eos = tok.eos_token
    assert reward_text(tok, "\n\nHuman: hi\n\nAssistant:", " hello", key="k") == \
        f"\n\nHuman: hi\n\nAssistant: hello{eos}"  # as TRL's RewardTrainer: EOS appended once
    assert reward_text(tok, "Q:", f" a{eos}", key="k") == f"Q: a{eos}"
    messages = [{"role": "user", "content": "hi"}]
    # the tiny tokenizer's HH-style template; an array of dicts (a Parquet round trip) reads the same
    assert reward_text(tok, messages, "hello", key="k") == "\n\nHuman: hi\n\nAssistant: hello"
    import numpy as np

    assert reward_text(tok, np.array(messages, dtype=object), "hello", key="k") == "\n\nHuman: hi\n\nAssistant: hello"
    tok.chat_template = None
    with pytest.raises(ConfigError, match="judge.reward_model: its tokenizer has no chat template"):
        reward_text(tok, messages, "hello", key="judge.reward_model")


def test_not_a_sequence_classifier_is_one_line_naming_the_key(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from rayalign.reward_model import RewardModel, check_reward_model

    with pytest.raises(ConfigError, match=r"^judge.reward_model: .* is LlamaForCausalLM, not a sequence "
                                          r"classifier; a reward model is an AutoModelForSequenceClassification"):
        check_reward_model(str(tiny_model_dir), "judge.reward_model")
    with pytest.raises(ConfigError, match="^eval.reward_model: model path .* does not exist"):
        check_reward_model(str(tmp_path / "absent"), "eval.reward_model")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.architectures, config.num_labels = ["LlamaForSequenceClassification"], 3
    config.save_pretrained(tmp_path / "three")
    with pytest.raises(ConfigError, match="^eval.reward_model: .* has 3 labels; a reward model has one"):
        check_reward_model(str(tmp_path / "three"), "eval.reward_model")
    with pytest.raises(ConfigError, match="^judge.reward_model: .* is LlamaForCausalLM"):  # the stage checks too
        RewardModel(str(tiny_model_dir), key="judge.reward_model")


def test_fitted_reward_model_agrees_with_the_gold_reward(reward_model_dir):
    """Held-out accuracy > 0.8, measured here by the judge's own loader and scorer on pairs of a seed the
    fit never saw (neither its training seed 0 nor its held-out seed)."""
    from rayalign.reward_model import RewardModel, check_reward_model
    from rayalign.tasks.sentiment import gold_pairs, gold_reward

    check_reward_model(str(reward_model_dir), "judge.reward_model")
    fit = json.loads((reward_model_dir / "fit_metrics.json").read_text())
    assert fit["heldout_accuracy"] > 0.8, fit
    rm = RewardModel(str(reward_model_dir), key="judge.reward_model", max_length=128)
    pairs = gold_pairs(200, seed=12345)
    scores = rm.score([p["prompt"] for p in pairs], [[p["chosen"], p["rejected"]] for p in pairs])
    assert all(gold_reward(p["chosen"]) > gold_reward(p["rejected"]) for p in pairs)
    accuracy = float((scores[:, 0] > scores[:, 1]).float().mean())
    assert accuracy > 0.8, accuracy
    # padding does not move a score: each text alone (no padding) scores as in its padded batch
    alone = torch.stack([rm.score([p["prompt"]], [[p["chosen"]]])[0, 0] for p in pairs[:8]])
    assert alone.tolist() == pytest.approx(scores[:8, 0].tolist(), abs=1e-5)


def _config(*overrides: str):
    from rayalign.config_loader import load_config

    return load_config(None, ["data.max_prompt_length=64", "data.max_completion_length=48", *overrides])


def _batch(prompt_ids: list[int]) -> pd.DataFrame:
    texts = [[" The acting was wonderful and the music was great.", " The plot was dull.",
              " Overall it felt boring and awful."],
             [" I found the cast charming.", " The ending was terrible.", " The pacing is slow."]]
    prompts = ["\n\nHuman: Review Night Train.\n\nAssistant:", "\n\nHuman: What did you think of Red Valley?"
               "\n\nAssistant:"]
    return pd.DataFrame({"prompt_id": prompt_ids, "prompt": prompts, "texts": texts})


def test_judge_with_a_reward_model_ranks_by_its_scores(tiny_model_dir, reward_model_dir, tmp_path):
    """Same columns as the implicit judge, the RM's scores in judge_rewards, best vs worst by them, the
    log-probs unchanged (the KL reads them); with eval.reward_model the eval prompts get rm_rewards."""
    from rayalign.judge import Judge, write_judged
    from rayalign.reward_model import RewardModel
    from rayalign.stages import EVAL_PROMPT_ID

    batch = _batch([1_000_000, EVAL_PROMPT_ID])
    implicit = Judge(str(tiny_model_dir), str(tiny_model_dir), _config())(batch)
    judge = Judge(str(tiny_model_dir), str(tiny_model_dir), _config(
        "judge.type=reward_model", f"judge.reward_model={reward_model_dir}", f"eval.reward_model={reward_model_dir}"))
    out = judge(batch)
    assert [c for c in out.columns if c != "rm_rewards"] == list(implicit.columns) and "rm_rewards" in out
    scores = RewardModel(str(reward_model_dir), key="k", max_length=112).score(list(batch["prompt"]),
                                                                            list(batch["texts"]))
    for i in range(2):
        assert out["judge_rewards"][i] == pytest.approx(scores[i].tolist(), abs=1e-5)
        assert out["chosen_index"][i] == int(scores[i].argmax()) and out["rejected_index"][i] == int(scores[i].argmin())
        assert out["margin"][i] == pytest.approx(float(scores[i].max() - scores[i].min()), abs=1e-5)
        assert out["confidence"][i] == pytest.approx(1 / (1 + math.exp(-out["margin"][i])), abs=1e-6)
        assert out["policy_logps"][i] == pytest.approx(implicit["policy_logps"][i], abs=1e-5)
    assert out["chosen"][0] == batch["texts"][0][0] and out["rejected"][0] == batch["texts"][0][2]  # gold: +2 vs -2
    assert all(math.isnan(v) for v in out["rm_rewards"][0])  # a training prompt: not scored for evaluation
    assert out["rm_rewards"][1] == pytest.approx(scores[1].tolist(), abs=1e-5)
    counts = write_judged(out, tmp := tmp_path / "judged.parquet")
    assert counts["pairs"] == 2 and "rm_rewards" not in pd.read_parquet(tmp).columns
    # a different evaluation model from the judge: scored separately, still only on the eval prompt
    only_eval = Judge(str(tiny_model_dir), str(tiny_model_dir), _config(f"eval.reward_model={reward_model_dir}"))
    out = only_eval(batch)
    assert out["judge_rewards"][1] == pytest.approx(implicit["judge_rewards"][1], abs=1e-6)
    assert out["rm_rewards"][1] == pytest.approx(scores[1].tolist(), abs=1e-5)


def test_judge_and_eval_config():
    from rayalign.config_loader import dump_config, load_config

    config = load_config(None, ["judge.type=reward_model", "judge.reward_model=org/rm", "eval.prompts=12"])
    assert (config.judge.type, config.judge.reward_model, config.eval.prompts) == ("reward_model", "org/rm", 12)
    assert load_config().judge.type == "implicit" and load_config().eval.reward_model is None
    for overrides, message in (
            (["judge.type=reward_model"], "judge.reward_model: set it to the reward model that judges"),
            (["judge.reward_model=org/rm"], "judge.reward_model: is read only with judge.type=reward_model"),
            (["judge.type=rm"], "judge.type: must be one of implicit, reward_model"),
            (["eval.prompts=0"], "eval.prompts: must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    assert "eval:\n  prompts: 12\n  reward_model: null\n" in dump_config(config)


def test_loop_eval_prompts_is_a_deprecated_alias(tmp_path, capsys):
    """The old key still works (YAML, override, a run's recorded config.yaml) with one line on stderr."""
    import yaml

    from rayalign.config_loader import build_config, load_config

    (tmp_path / "old.yaml").write_text("loop:\n  eval_prompts: 32\n  iterations: 2\n")
    assert load_config(tmp_path / "old.yaml").eval.prompts == 32
    assert load_config(None, ["loop.eval_prompts=7"]).eval.prompts == 7
    assert load_config(tmp_path / "old.yaml", ["eval.prompts=5"]).eval.prompts == 5  # later wins, as always
    assert build_config(yaml.safe_load("loop: {eval_prompts: 9}")).eval.prompts == 9
    err = capsys.readouterr().err
    assert "rayalign: loop.eval_prompts is deprecated: read as eval.prompts (write eval.prompts instead)" in err
    with pytest.raises(ConfigError, match="loop.eval_prompts: renamed eval.prompts, and both are set"):
        build_config({"loop": {"eval_prompts": 9}, "eval": {"prompts": 3}})


def _eval_rows(rewards: list[list[float]], gold: list[list[float]] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame({"prompt_id": range(len(rewards)), "rm_rewards": rewards,
                          "policy_logps": [[-1.0, -2.0]] * len(rewards), "sft_logps": [[-1.5, -2.0]] * len(rewards)})
    if gold is not None:
        frame["gold_rewards"] = gold
    return frame


def test_compare_rm_hand_values():
    """Per prompt: the mean of its samples' rewards; win rate over prompts, ties 1/2.
    policy means (1.5, 0, 2), sft means (1, 0, 3): win, tie, loss -> (1 + 0.5 + 0) / 3 = 0.5;
    reward_mean = (1.5 + 0 + 2) / 3 = 7/6."""
    from rayalign.evaluate import compare_rm

    policy = _eval_rows([[1.0, 2.0], [0.5, -0.5], [2.0, 2.0]])
    sft = _eval_rows([[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
    assert compare_rm(policy, {"sft": sft, "prev": policy}) == pytest.approx(
        {"rm/reward_mean": 7 / 6, "rm/win_rate_vs_sft": 0.5, "rm/win_rate_vs_prev": 0.5})


def test_iteration_record_and_report_with_eval_reward_model(tmp_path):
    """loop.task=none with eval.reward_model: the record has the rm/* keys (no gold ones), the report
    its columns and the plot its two panels."""
    from rayalign.loop import iteration_record
    from rayalign.report import write_report

    (tmp_path / "eval").mkdir()
    _eval_rows([[0.0, 0.0], [1.0, 1.0]]).to_parquet(tmp_path / "eval/sft.parquet")
    _eval_rows([[1.0, 1.0], [1.0, 1.0]]).to_parquet(tmp_path / "eval/iter-0.parquet")
    (tmp_path / "iter-0/train").mkdir(parents=True)
    (tmp_path / "iter-0/train/metrics.jsonl").write_text(
        json.dumps({"step": 1, "loss": 0.6, "rewards/margins": 0.1}) + "\n")
    config = _config("loop.task=none", "eval.reward_model=org/rm")
    record = iteration_record(config, tmp_path, 0, name="iter-0", previous="sft", pairs=4, seconds=1.0,
                              judged_path=None)
    assert record["rm/win_rate_vs_sft"] == 0.75 and record["rm/win_rate_vs_prev"] == 0.75  # win, tie
    assert record["rm/reward_mean"] == 1.0 and "win_rate_vs_sft" not in record
    assert record["kl_to_ref"] == pytest.approx(0.25)
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    report = write_report(tmp_path).read_text()
    assert "| iteration | pairs | win_rate_vs_sft | win_rate_vs_prev | gold_reward_mean | rm/win_rate_vs_sft | " \
           "rm/win_rate_vs_prev | rm/reward_mean | judge_accuracy |" in report
    assert "| 0 | 4 | - | - | - | 0.750 | 0.750 | 1.000 | - |" in report
    assert (tmp_path / "plots/iterations.png").stat().st_size > 0


def test_cli_refuses_a_causal_lm_as_reward_model_before_any_work(tiny_model_dir, tmp_path, capsys):
    """Exit 2, one line naming the key, nothing written, Ray never started (the check runs in prepare_run_dir)."""
    from rayalign.cli import main

    for key, extra in (("judge.reward_model", ["judge.type=reward_model"]), ("eval.reward_model", [])):
        run_dir = tmp_path / key
        code = main(["judge", "configs/quickstart.yaml", f"run.dir={run_dir}", f"model.policy={tiny_model_dir}",
                     *extra, f"{key}={tiny_model_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"rayalign: config error: {key}: {tiny_model_dir} is LlamaForCausalLM, not a "
                                 "sequence classifier"), err
        assert not run_dir.exists()
