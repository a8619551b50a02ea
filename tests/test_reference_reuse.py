"""The judge's log-probs as the next iteration's reference log-probs (issue 15: no second scoring pass).

In iteration i >= 1 the reference of training is pi_{i-1}, which has just judged the very samples it trains
on. These tests judge samples in-process with the Judge actor class, write the loop's artifacts (samples,
judged pairs, K-sample groups, gold best-vs-worst pairs), read them back as training reads them, and check
that the reference columns taken from the data equal what the reference-scoring pass (ReferenceScorer on
PairEncoder's ids) computes, sums and per-token means, and that the losses of a moved policy equal the
scored path's, to 1e-5: for string prompts (tiny model) and message-list prompts (ChatML chat model).
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from rayalign.data_kind import GROUPS, PAIRS

TEXTS = [" The acting was wonderful and the music was great.", " The plot was dull.",
         " Overall it felt boring and awful.", " I liked it, mostly."]
STRING_PROMPTS = ["Review: the movie was", "Review: the restaurant was", "Review: the book was"]
MESSAGE_PROMPTS = [[{"role": "user", "content": f"How was the {thing}?"}] for thing in ("movie", "meal", "book")]
LENGTHS = {"max_prompt_length": 64, "max_completion_length": 24}


def _config(*overrides: str):
    from rayalign.config_loader import load_config

    return load_config(None, [f"data.{key}={value}" for key, value in LENGTHS.items()] + list(overrides))


def _moved_copy(model_dir: str, out, seed: int) -> str:
    """`model_dir` with every weight moved by seeded noise, saved with its tokenizer to `out`."""
    from rayalign.models import load_model, load_tokenizer

    model = load_model(model_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return str(out)


def _judged_artifacts(model_dir: str, prompts: list, tmp_path) -> tuple:
    """Judge K = 4 samples per prompt with `model_dir` as pi_{i-1} (a moved copy as pi_SFT); write samples
    and pairs."""
    from rayalign.generate import write_samples
    from rayalign.judge import Judge, write_judged
    from rayalign.templating import prompt_columns

    k = len(TEXTS)
    batch = pd.DataFrame({"prompt_id": range(len(prompts)), **prompt_columns(prompts), "texts": [TEXTS] * len(prompts),
                          "token_ids": [[[1]] * k] * len(prompts), "logprobs": [[[-1.0]] * k] * len(prompts),
                          "finish_reasons": [["stop"] * k] * len(prompts)})
    judged = Judge(model_dir, _moved_copy(model_dir, tmp_path / "sft", seed=1), _config())(batch)
    samples = write_samples(judged, tmp_path / "samples.parquet")
    assert "policy_logp" in samples
    counts = write_judged(judged, tmp_path / "judged.parquet")
    assert counts["pairs"] == len(prompts)
    return samples, pd.read_parquet(tmp_path / "judged.parquet")


def _training_rows(path, tokenizer) -> list[dict]:
    from rayalign.data import load_rows

    return load_rows(path, tokenizer=tokenizer).rows


def _reused_and_scored(model_dir: str, rows: list[dict], kind: str, config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prepared frames of `rows`: with the rows' own reference columns, and scored by the reference model."""
    from rayalign.encode import TEXT_FIELDS
    from rayalign.models import load_tokenizer
    from rayalign.prepare import PairEncoder, ReferenceScorer, reference_from_rows, with_row_reference

    frame = pd.DataFrame({"pair_index": range(len(rows)), **{f: [r[f] for r in rows] for f in TEXT_FIELDS[kind]}})
    encoded = PairEncoder(model_dir, kind=kind, **LENGTHS)(frame)
    reference = reference_from_rows(rows, kind)
    assert reference is not None, "the loop's training rows lost their reference log-probs"
    pad = load_tokenizer(model_dir).pad_token_id
    return with_row_reference(encoded, reference, kind), ReferenceScorer(model_dir, config, pad, kind=kind)(encoded)


def _assert_columns_equal(reused: pd.DataFrame, scored: pd.DataFrame, columns: tuple[str, ...]) -> None:
    for column in columns:
        got = torch.tensor([list(v) if hasattr(v, "__len__") else v for v in reused[column]], dtype=torch.float64)
        want = torch.tensor([list(v) if hasattr(v, "__len__") else v for v in scored[column]], dtype=torch.float64)
        # The judge forwards padded rows, the scorer packed ones (the default): the same sums, rounded apart
        # in float32 by up to ~1e-6 of their size (measured 1e-4 on -81.33).
        assert torch.allclose(got, want, atol=1e-5, rtol=5e-6), (column, got, want)


def _losses(model_dir: str, moved_dir: str, frame: pd.DataFrame, kind: str, config, *,
            reference=None) -> torch.Tensor:
    """Per-row losses of a moved policy on `frame` (reference columns from the frame, or `reference`)."""
    from rayalign.encode import collate, encoded_rows
    from rayalign.group_batching import GROUP_REF_KEY, group_reference_column
    from rayalign.models import load_model, load_tokenizer
    from rayalign.step import REF_KEYS, micro_batch_loss

    base, policy = load_model(model_dir), load_model(moved_dir)
    batch = collate(encoded_rows(frame, kind), kind, pad_token_id=load_tokenizer(model_dir).pad_token_id)
    if reference is None:
        batch.update({k: torch.tensor(frame[k].to_numpy()) for k in REF_KEYS if k in frame})
        batch.update(group_reference_column(frame))
        assert REF_KEYS[0] in batch or GROUP_REF_KEY in batch
    with torch.no_grad():
        return micro_batch_loss(policy, batch, config, reference=base if reference else None,
                                kind=kind).losses.double()


@pytest.mark.parametrize("model, prompts", [("tiny_model_dir", STRING_PROMPTS), ("chat_model_dir", MESSAGE_PROMPTS)],
                         ids=["string-prompts", "message-prompts"])
def test_judged_pairs_carry_the_reference_log_probs(model, prompts, request, tmp_path):
    from rayalign.models import load_tokenizer
    from rayalign.step import REF_KEYS

    model_dir = str(request.getfixturevalue(model))
    _, judged = _judged_artifacts(model_dir, prompts, tmp_path)
    rows = _training_rows(tmp_path / "judged.parquet", load_tokenizer(model_dir))
    for loss in ("dpo", "ipo"):  # ipo: per-token means of the reference log-probs
        config = _config(f"loss.type={loss}")
        reused, scored = _reused_and_scored(model_dir, rows, PAIRS, config)
        _assert_columns_equal(reused, scored, REF_KEYS)
        moved = _moved_copy(model_dir, tmp_path / f"policy-{loss}", seed=2)
        assert torch.allclose(_losses(model_dir, moved, reused, PAIRS, config),
                              _losses(model_dir, moved, scored, PAIRS, config, reference=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model, prompts", [("tiny_model_dir", STRING_PROMPTS), ("chat_model_dir", MESSAGE_PROMPTS)],
                         ids=["string-prompts", "message-prompts"])
def test_groups_and_gold_pairs_carry_the_reference_log_probs(model, prompts, request, tmp_path):
    from rayalign.data import write_rows_parquet
    from rayalign.group_batching import GROUP_REF_KEY
    from rayalign.judge import best_worst_pairs, sample_groups
    from rayalign.models import load_tokenizer
    from rayalign.step import REF_KEYS

    model_dir = str(request.getfixturevalue(model))
    tokenizer = load_tokenizer(model_dir)
    samples, judged = _judged_artifacts(model_dir, prompts, tmp_path)
    groups, _ = sample_groups(samples, judged, rewards="judge", tokenizer=tokenizer)
    write_rows_parquet(groups, tmp_path / "groups.parquet")
    config = _config("loss.type=exo_rw")
    reused, scored = _reused_and_scored(model_dir, _training_rows(tmp_path / "groups.parquet", tokenizer), GROUPS,
                                        config)
    _assert_columns_equal(reused, scored, (GROUP_REF_KEY,))
    moved = _moved_copy(model_dir, tmp_path / "policy", seed=2)
    assert torch.allclose(_losses(model_dir, moved, reused, GROUPS, config),
                          _losses(model_dir, moved, scored, GROUPS, config, reference=True), atol=1e-5, rtol=0)

    gold, _ = sample_groups(samples, judged, rewards="gold", tokenizer=tokenizer)
    write_rows_parquet(best_worst_pairs(gold), tmp_path / "gold_pairs.parquet")
    config = _config()
    reused, scored = _reused_and_scored(model_dir, _training_rows(tmp_path / "gold_pairs.parquet", tokenizer), PAIRS,
                                        config)
    _assert_columns_equal(reused, scored, REF_KEYS)


def test_rows_without_reference_log_probs_are_scored():
    from rayalign.prepare import reference_from_rows

    pair = {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert reference_from_rows([pair], PAIRS) is None
    assert reference_from_rows([{**pair, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}, pair], PAIRS) is None
    both = reference_from_rows([{**pair, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}], PAIRS)
    assert both.to_dict("records") == [{"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]


def test_the_loop_reuses_the_judge_only_for_the_same_quantity():
    from rayalign.loop import judge_logps_reusable

    assert judge_logps_reusable(_config())
    assert not judge_logps_reusable(_config("ref.reuse_judge=false"))
    assert not judge_logps_reusable(_config("loss.logit_temperature=0.5"))  # the judge scores at temperature 1
    assert not judge_logps_reusable(_config("loss.type=mallows_theta"))  # needs the reference's entropies
