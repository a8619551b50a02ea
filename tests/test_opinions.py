"""The synthetic opinion task (rayalign/tasks/opinions.py), the eval's alignment gap `eval/gdpo/js_gap`
against a direct computation, and configs/tune_gdpo.yaml. No Ray: the gap is checked on the exact path the
Ray Train worker's `evaluate` takes (PairEncoder -> prepared rows -> collate -> micro_batch_loss ->
belief_gap_sums), minus the loop over shards and the all-reduce."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from rayalign.tasks import opinions

REPO_CONFIG = "configs/tune_gdpo.yaml"


def test_task_questions_and_targets():
    task = opinions.make_task(seed=0)
    assert len(task.questions) == 50 and len(task.groups) >= 3
    for q in task.questions:
        levels = [level for level, _ in q.options]
        assert 2 <= len(levels) <= 5 and len(set(levels)) == len(levels)
        assert all(0 <= level < opinions.LEVELS for level in levels)
        for group in task.groups:
            target = task.targets[(group, q.qid)]
            assert len(target) == opinions.LEVELS and math.isclose(sum(target), 1.0, abs_tol=1e-9)
            assert all((p > 0) == (level in levels) for level, p in enumerate(target))  # p* = 0 off the options


def test_rows_pass_the_gdpo_format_and_tokenizer_checks(tmp_path):
    """Every row loads as "gdpo"; a tiny-model tokenizer trained on the task's corpus encodes the level digit
    as the completion's first token and '>' as its own token (`encode_gdpo` raises otherwise), for GDPO and
    for the DPO baseline's pairs."""
    from rayalign.batching import encode_gdpo, encode_levels, gdpo_rows_as_pairs
    from rayalign.data import load_rows
    from rayalign.tiny import read_corpus, train_tokenizer

    paths = opinions.write_task(tmp_path, per_prompt=2, num_questions=12)
    train, held = load_rows(paths["train"]), load_rows(paths["eval"])
    assert (train.format, held.format) == ("gdpo", "gdpo")
    assert len(train.rows) == 2 * 12 * len(opinions.GROUPS) and len(held.rows) == 12 * len(opinions.GROUPS)
    assert {r["group"] for r in train.rows} == set(opinions.GROUPS)
    tokenizer = train_tokenizer(read_corpus(paths["corpus"]))
    for row in train.rows + held.rows:
        encoded = encode_gdpo(tokenizer, row, max_prompt_length=64, max_completion_length=48)
        assert not encoded["prompt_truncated"] and not encoded["completion_truncated"]
    for pair in gdpo_rows_as_pairs(held.rows):
        encode_levels(tokenizer, pair, max_prompt_length=64, max_completion_length=48)
    sft = pd.read_json(paths["sft"], lines=True)
    assert sft["completion"].str.match(r"^\d<[^>]+> ").all() and len(sft) == len(train.rows)


def test_belief_frequencies_approach_the_target():
    task = opinions.make_task(seed=3, num_questions=4)
    rows = opinions.gdpo_rows(task, per_prompt=3000, seed=4)
    counts: dict = {}
    for r in rows:
        counts.setdefault((r["group"], r["question"]), Counter())[r["belief"]] += 1
        assert r["rejected_belief"] != r["belief"] and r["target"][r["rejected_belief"]] > 0
    for key, count in counts.items():
        target = task.targets[key]
        # 3000 draws: a frequency's standard deviation is at most 0.0092, so 0.035 is over 3.8 of them
        assert max(abs(count[level] / 3000 - p) for level, p in enumerate(target)) < 0.035


def test_the_task_is_deterministic():
    def build(seed):
        task = opinions.make_task(seed=seed)
        return opinions.gdpo_rows(task, per_prompt=2, seed=seed + 1), opinions.test_prompts(task)

    assert build(0) == build(0)
    assert build(0)[0] != build(1)[0]


def _direct_gap(model, tokenizer, rows: list[dict]) -> float:
    """Mean JS distance (natural log, square root) between p* and the softmax over the L digit logits after
    each prompt, from a plain forward of the prompt alone and the textbook formula."""
    gaps = []
    for row in rows:
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        digits = [tokenizer(str(d), add_special_tokens=False)["input_ids"][0] for d in range(len(row["target"]))]
        q = torch.softmax(logits[digits], -1).tolist()
        p, m = row["target"], [(a + b) / 2 for a, b in zip(row["target"], q)]
        kl = [sum(a * math.log(a / c) for a, c in zip(x, m) if a > 0) for x in (p, q)]
        gaps.append(math.sqrt((kl[0] + kl[1]) / 2))
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize("overrides", [["loss.type=gdpo"], ["loss.type=dpo"],
                                       ["loss.type=dpo", "train.padding_free=true"]])
def test_js_gap_matches_a_direct_computation(tiny_model_dir, overrides):
    """GDPO rows and the DPO baseline's pairs made from them (the driver's `pair_rows`) keep p* through the
    Ray Data encoder and the prepared rows, and the eval's gap equals the direct computation."""
    from rayalign.config_loader import load_config
    from rayalign.encode import collate_with_reference, encoded_rows
    from rayalign.models import load_model, load_tokenizer
    from rayalign.prepare import PairEncoder
    from rayalign.step import belief_gap_sums, micro_batch_loss
    from rayalign.train import pair_rows

    config = load_config(None, overrides)
    model, tokenizer = load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    rows = opinions.gdpo_rows(opinions.make_task(seed=0, num_questions=3), per_prompt=1, seed=1)[:5]
    kind, pairs = pair_rows("gdpo", rows, config)
    frame = pd.DataFrame(pairs).assign(pair_index=range(len(pairs)))
    for column in ("target", "level_target"):  # Ray Data hands list columns to the encoder as numpy arrays
        if column in frame:
            frame[column] = [np.asarray(v) for v in frame[column]]
    encoded = encoded_rows(PairEncoder(str(tiny_model_dir), 256, 128, kind=kind)(frame), kind)  # nothing truncated
    batch = collate_with_reference(encoded, {}, torch.arange(len(encoded)), kind=kind,
                                   pad_token_id=tokenizer.pad_token_id)
    out = micro_batch_loss(model, batch, config, reference=model, kind=kind)
    count, total = belief_gap_sums(out.level_logps, batch["target_probs"]).tolist()
    assert count == len(rows)
    assert total / count == pytest.approx(_direct_gap(model, tokenizer, rows), abs=1e-5)


def test_baseline_pairs_must_start_with_a_level_digit(tiny_model_dir):
    from rayalign.batching import encode_levels
    from rayalign.models import load_tokenizer

    pair = {"prompt": "Q?", "chosen": "yes<x> a", "rejected": "0<y> b", "level_target": [0.5, 0.5]}
    with pytest.raises(ValueError, match="does not start with a level digit"):
        encode_levels(load_tokenizer(str(tiny_model_dir)), pair, max_prompt_length=8, max_completion_length=8)


def test_tune_yaml_loads_and_every_trial_is_valid():
    from rayalign.config_loader import load_config
    from rayalign.tune_space import check_space, parse_space

    config = load_config(REPO_CONFIG)
    assert (config.tune.metric, config.tune.mode) == ("eval/gdpo/js_gap", "min")
    space = config.tune.space
    assert space["loss.type"] == {"grid": ["dpo", "gdpo"]}
    assert {"loss.beta", "optim.lr", "loss.gdpo_calibration_weight", "loss.gdpo_belief_nll_weight"} <= set(space)
    assert config.data.eval_file and config.model.policy  # the experiment's --prepare output
    trials = check_space(config, parse_space(space))
    assert {t.loss.type for t in trials} == {"dpo", "gdpo"}
