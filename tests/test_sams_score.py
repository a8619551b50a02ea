"""SamS scoring in the loop's pass (`rayalign.sams_score`): the bandit of the judging policy's sams.pt scores each
judged pair exactly as the training stage would see the pair, and the iteration record and report show it.

The judging policy is the tiny model with a bandit trained for a few rounds on random contexts (so a fresh,
seeded bandit would score differently); the judge is the real `Judge` (pi_SFT a moved copy of it). One Ray
Data pass checks the actors' chaining after the judges (`rayalign.stages.judged_pass`).
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.sams_score import SCORE_COLUMN, SamsScorer, score_summary
from tests.test_reference_reuse import _moved_copy

TEXTS = [" a fine film", " a dull film", " fine acting and a good plot", " bad"]


def _config(*extra):
    return load_config(None, ["sams.enabled=true", "judge.batch_size=4", "data.max_completion_length=16", *extra])


def _policy_with_bandit(tiny_model_dir, tmp_path, config) -> tuple[str, torch.nn.Module]:
    """A copy of the tiny model whose directory holds a bandit trained for 4 rounds (sams.pt), and that bandit."""
    from rayalign.models import load_model
    from rayalign.sams_select import PairSelector

    out = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, out)
    shape = load_model(str(out)).config
    selector = PairSelector(config, num_layers=shape.num_hidden_layers, hidden_size=shape.hidden_size,
                            total_steps=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        n = 8
        selector.select(start=0, n=n, losses=torch.rand(n, generator=g), margins=torch.randn(n, generator=g),
                        chosen_logps=-torch.rand(n, generator=g) * 20,
                        context=torch.randn(n, shape.num_hidden_layers, shape.hidden_size, generator=g))
    selector.save(out)
    return str(out), selector.scheduler


def _judged(policy: str, config, prompt_ids: list[int], tmp_path) -> pd.DataFrame:
    from rayalign.judge import Judge
    from rayalign.templating import prompt_columns

    prompts = [f"Review {i}:" for i in prompt_ids]
    k = len(TEXTS)
    batch = pd.DataFrame({"prompt_id": prompt_ids, **prompt_columns(prompts), "texts": [TEXTS] * len(prompts),
                          "token_ids": [[[1]] * k] * len(prompts), "logprobs": [[[-1.0]] * k] * len(prompts),
                          "finish_reasons": [["stop"] * k] * len(prompts)})
    return Judge(policy, _moved_copy(policy, tmp_path / "sft", seed=1), config)(batch)  # pi_SFT != pi: no ties


def test_scores_are_the_bandits_prediction_on_the_training_stages_pairs(tiny_model_dir, tmp_path):
    from rayalign.data import load_rows
    from rayalign.data_kind import PAIRS
    from rayalign.encode import collate, encoded_rows
    from rayalign.judge import write_judged
    from rayalign.models import load_model, load_tokenizer
    from rayalign.prepare import encode_frame
    from rayalign.step import sequence_scores

    config = _config()
    policy, bandit = _policy_with_bandit(tiny_model_dir, tmp_path, config)
    judged = _judged(policy, config, [0, 1, 2, 100], tmp_path)
    assert (judged["dropped"] == "").all()
    judged.loc[judged.index[1], "dropped"] = "tie"  # a dropped row is not scored
    scored = SamsScorer(policy, config, below_id=100)(judged)  # 100: the pass's evaluation prompts
    scores = scored[SCORE_COLUMN].tolist()
    assert math.isnan(scores[1]) and math.isnan(scores[3]) and all(s == s for s in (scores[0], scores[2]))

    # What the training stage reads from judged.parquet, encoded and forwarded its way
    write_judged(scored.iloc[:3], tmp_path / "judged.parquet")
    tokenizer = load_tokenizer(policy)
    rows = load_rows(str(tmp_path / "judged.parquet"), tokenizer=tokenizer).rows
    stored = pd.read_parquet(tmp_path / "judged.parquet")[SCORE_COLUMN].tolist()
    assert stored == [scores[0], scores[2]]  # judged.parquet keeps the scores of its pairs
    frame = pd.DataFrame(rows).assign(pair_index=range(len(rows)))
    encoded = encode_frame(tokenizer, frame, PAIRS, max_prompt_length=config.data.max_prompt_length,
                           max_completion_length=config.data.max_completion_length)
    batch = collate(encoded_rows(encoded, PAIRS), PAIRS, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        context = sequence_scores(load_model(policy), batch, want_context=True).context
    expected = bandit.predict(context)
    assert [scores[0], scores[2]] == pytest.approx(expected.tolist(), abs=1e-6)
    fresh = SamsScorer(str(tiny_model_dir), config)  # no sams.pt: no scores, a warning
    assert fresh.scheduler is None and fresh(judged)[SCORE_COLUMN].isna().all()


def test_score_summary_and_report_columns():
    from rayalign.report import _columns

    judged = pd.DataFrame({SCORE_COLUMN: [0.5, 0.1, math.nan, 0.3]})
    summary = score_summary(judged, [True, False, True, None])
    assert summary == pytest.approx({"sams/score_mean": 0.3, "sams/score_gap": 0.4})
    assert score_summary(judged) == pytest.approx({"sams/score_mean": 0.3})
    assert score_summary(pd.DataFrame({"margin": [1.0]})) == {}
    columns = _columns([{"iteration": 1, **summary}])
    assert columns.index("sams/score_gap") == columns.index("judge_accuracy") + 2


@pytest.mark.slow
@pytest.mark.usefixtures("in_process_ray")
def test_the_pass_chains_scoring_actors_after_the_judges(tiny_model_dir, tmp_path):
    from rayalign.stages import judged_pass
    from rayalign.tiny import make_tiny_model
    from rayalign.train import ensure_ray

    config = _config("generate.num_samples=2", "generate.max_new_tokens=8", "generate.batch_size=4")
    policy, _ = _policy_with_bandit(tiny_model_dir, tmp_path, config)
    ensure_ray()
    prompts = pd.DataFrame({"prompt_id": [0, 1, 2, 100], "prompt": [f"Review {i}:" for i in range(4)]})
    # the reference must differ from the policy: with equal models every margin is 0 up to float noise, and a
    # pair whose margin is exactly 0 is dropped as a tie (it was, now and then: nothing was left to score)
    sft = make_tiny_model(tmp_path / "sft", seed=1)  # the same tokenizer, other weights
    rows = judged_pass(config, prompts, model=policy, sft_path=str(sft), sams_below_id=100)
    rows = rows.sort_values("prompt_id").reset_index(drop=True)
    kept = (rows["dropped"] == "") & (rows["prompt_id"] < 100)
    assert kept.any() and rows.loc[kept, SCORE_COLUMN].notna().all() and rows.loc[~kept, SCORE_COLUMN].isna().all()
