"""Format detection, validation and normalization, one record at a time, plus the shared Anthropic HH file.

No files except the HH test (skipped when /work/shared is absent); no tokenizer (see test_data_chat.py).
"""

import gzip
import json
import math
from pathlib import Path

import pytest

from rayalign.data import FORMATS, detect_format, load_rows, normalize_row, split_implicit_prompt

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

EXAMPLES = {
    "explicit": {"prompt": "Q?", "chosen": " yes", "rejected": " no"},
    "implicit": {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
    "conversational": {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    },
    "implicit_conversational": {
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
    },
    "ultrafeedback": {
        "prompt": "hi",
        "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}],
        "score_chosen": 8.5,
        "score_rejected": 3,
    },
    "prompt_only": {"prompt": "Write a poem."},
    "conversational_prompt_only": {"prompt": [{"role": "user", "content": "Write a poem."}]},
    "messages": {"messages": [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "No."}]},
    "k_sample": {"prompt": "Q?", "completions": ["a", "b", "c"], "rewards": [1, 0.5, -2]},
    "gdpo": {
        "prompt": "Is tea good?", "target": [0.2, 0.5, 0.3], "belief": 1, "belief_text": "somewhat",
        "chosen": " Tea is fine.", "rejected": " Tea is awful.", "rejected_belief": 0,
        "rejected_belief_text": "no", "group": "UK",
    },
}


def problems_of(record, fmt):
    row, problems = normalize_row(record, fmt)
    assert row is None
    return dict(problems)


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_names_each_example(fmt):
    assert detect_format(EXAMPLES[fmt]) == fmt


def test_detect_format_rejects_unknown_records():
    with pytest.raises(ValueError, match="none of the known fields"):
        detect_format({"question": "x"})
    with pytest.raises(ValueError, match="must be an object"):
        detect_format([1, 2])
    # null-valued fields count as absent (Parquet fills missing columns with None)
    assert detect_format({"prompt": "x", "chosen": None, "rejected": None}) == "prompt_only"


def test_explicit_and_prompt_only_normalize_and_keep_id():
    assert normalize_row({**EXAMPLES["explicit"], "id": 7, "extra": 1}, "explicit") == (
        {"prompt": "Q?", "chosen": " yes", "rejected": " no", "id": 7}, [])
    assert normalize_row({"prompt": "P", "id": "a"}, "prompt_only") == ({"prompt": "P", "id": "a"}, [])
    assert problems_of({"prompt": "P", "id": 1.5}, "prompt_only") == {
        "id": "must be a string or an integer, got float"}


def test_implicit_prompt_ends_at_last_assistant_tag():
    row, _ = normalize_row(EXAMPLES["implicit"], "implicit")
    assert row == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go"}


def test_implicit_prompt_cuts_inside_a_shared_reply_back_to_the_tag():
    chosen = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: Sure thing"
    rejected = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: Sure, no"
    prompt, c, r = split_implicit_prompt(chosen, rejected)
    assert prompt.endswith("c\n\nAssistant:") and c == " Sure thing" and r == " Sure, no"


def test_implicit_fallback_cuts_to_whitespace_boundary():
    assert split_implicit_prompt("The cat sat", "The cat sang") == ("The cat", " sat", " sang")
    assert split_implicit_prompt("Q: hi\n\nA yes", "Q: hi\n\nA no") == ("Q: hi\n\nA", " yes", " no")
    assert split_implicit_prompt("Q: x \n yes", "Q: x \n no") == ("Q: x", " \n yes", " \n no")
    with pytest.raises(ValueError, match="share no prompt"):
        split_implicit_prompt("Yes", "No")
    with pytest.raises(ValueError, match="share no prompt"):
        split_implicit_prompt("Cats", "Catalog")  # common prefix without whitespace
    assert "prompt" in problems_of({"chosen": "abc", "rejected": "xyz"}, "implicit")


def test_conversational_uses_the_hh_style_fallback_template_without_tokenizer():
    row, _ = normalize_row(EXAMPLES["conversational"], "conversational")
    assert row == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away"}
    system = {**EXAMPLES["conversational"], "prompt": [{"role": "system", "content": "Be nice."},
                                                      {"role": "user", "content": "hi"}]}
    prompt = normalize_row(system, "conversational")[0]["prompt"]
    assert prompt == "\n\nSystem: Be nice.\n\nHuman: hi\n\nAssistant:"


def test_conversational_errors():
    record = {**EXAMPLES["conversational"], "chosen": [{"role": "user", "content": "hello"}]}
    assert "does not start with the rendered prompt" in problems_of(record, "conversational")["chosen"]
    record = {**EXAMPLES["conversational"], "rejected": [{"role": "assistant"}]}
    assert problems_of(record, "conversational") == {"rejected[0].content": "must be a string, got null"}
    record = {k: v for k, v in EXAMPLES["conversational"].items() if k != "prompt"}
    assert detect_format(record) == "implicit_conversational"
    assert "rows without one are 'implicit_conversational'" in problems_of(record, "conversational")["prompt"]
    record = {**EXAMPLES["conversational"], "chosen": [{"role": "assistant", "content": "  "}]}
    assert "no content" in problems_of(record, "conversational")["chosen"]
    record = {**EXAMPLES["conversational"], "prompt": []}
    assert problems_of(record, "conversational") == {"prompt": "is empty (no messages)"}


def test_ultrafeedback_renders_the_turns_before_the_final_one_and_keeps_scores():
    row, _ = normalize_row(EXAMPLES["ultrafeedback"], "ultrafeedback")
    assert row == {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": " go away",
                   "score_chosen": 8.5, "score_rejected": 3.0}


def test_ultrafeedback_errors():
    base = EXAMPLES["ultrafeedback"]
    other = [{"role": "user", "content": "HI"}, {"role": "assistant", "content": "go away"}]
    assert "differ from chosen's" in problems_of({**base, "rejected": other}, "ultrafeedback")["rejected"]
    only = [{"role": "assistant", "content": "hello"}]
    assert "final assistant turn" in problems_of({**base, "chosen": only}, "ultrafeedback")["chosen"]
    assert problems_of({**base, "score_chosen": "high"}, "ultrafeedback") == {
        "score_chosen": "must be a number, got string"}
    assert problems_of({**base, "rejected": base["chosen"]}, "ultrafeedback") == {
        "chosen": "is identical to rejected"}


def test_pair_field_errors_are_all_collected():
    problems = problems_of({"prompt": "   ", "chosen": 3, "rejected": ""}, "explicit")
    assert problems == {"prompt": "is whitespace-only", "chosen": "must be a string, got int",
                        "rejected": "is empty"}
    assert problems_of({"prompt": "p", "chosen": None}, "explicit") == {"chosen": "is null",
                                                                        "rejected": "missing field"}
    assert problems_of({"prompt": "p", "chosen": "x", "rejected": "x"}, "explicit") == {
        "chosen": "is identical to rejected"}
    record = {"prompt": "p", "chosen": "x", "rejected": "y", "score_rejected": math.inf}
    assert problems_of(record, "explicit") == {"score_rejected": "must be a finite number, got inf"}


def test_k_sample_normalizes_rewards_to_floats():
    row, _ = normalize_row(EXAMPLES["k_sample"], "k_sample")
    assert row == {"prompt": "Q?", "completions": ["a", "b", "c"], "rewards": [1.0, 0.5, -2.0]}
    assert all(isinstance(r, float) for r in row["rewards"])
    # an empty sample is allowed: a model may answer with EOS at once
    assert normalize_row({"prompt": "Q", "completions": ["", "b"], "rewards": [0, 1]}, "k_sample")[1] == []


@pytest.mark.parametrize("change, field, message", [
    ({"completions": ["only"], "rewards": [1]}, "completions", "needs K >= 2 completions, got 1"),
    ({"rewards": [1, 2]}, "rewards", "has 2 values for 3 completions"),
    ({"rewards": [1, float("nan"), 0]}, "rewards[1]", "must be a finite number, got nan"),
    ({"rewards": [1, True, 0]}, "rewards[1]", "must be a number, got bool"),
    ({"rewards": "1,2,3"}, "rewards", "must be a list of numbers, got string"),
    ({"completions": ["a", 2]}, "completions", "must be a list of strings, got a list holding int, string"),
    ({"completions": None}, "completions", "is null"),
    ({"prompt": ""}, "prompt", "is empty"),
])
def test_k_sample_errors(change, field, message):
    assert problems_of({**EXAMPLES["k_sample"], **change}, "k_sample")[field] == message


def test_gdpo_normalizes():
    row, problems = normalize_row({**EXAMPLES["gdpo"], "target": [0.2, 0.5, 0.30001]}, "gdpo")
    assert problems == []
    assert row["target"] == [0.2, 0.5, 0.30001] and row["belief"] == 1 and row["group"] == "UK"
    assert set(row) == {"prompt", "target", "belief", "belief_text", "chosen", "rejected", "rejected_belief",
                        "rejected_belief_text", "group"}


@pytest.mark.parametrize("change, field, message", [
    ({"target": [0.2, 0.5, 0.2]}, "target", "must sum to 1 (within 1e-4), sums to 0.9"),
    ({"target": [0.5, 0.5, 0.0002]}, "target", "must sum to 1 (within 1e-4), sums to 1.0002"),
    ({"target": [1.2, -0.2]}, "target", "has a negative probability: [1.2, -0.2]"),
    ({"target": [1.0]}, "target", "must be a list of 2..10 probabilities, got 1"),
    ({"target": [0.0625] * 16}, "target", "must be a list of 2..10 probabilities, got 16"),
    ({"target": [0.5, "0.5"]}, "target[1]", "must be a number, got string"),
    ({"belief": 3}, "belief", "level 3 is out of range for a target of 3 levels"),
    ({"rejected_belief": -1}, "rejected_belief", "level -1 is out of range for a target of 3 levels"),
    ({"belief": 1.0}, "belief", "must be an integer level, got float"),
    ({"rejected_belief": 1}, "rejected_belief",
     "equals belief; rejected must be an answer of another belief"),
    ({"target": [0.5, 0.0, 0.5]}, "belief",
     "level 1 has target probability 0 (beliefs are drawn from the target)"),
    ({"belief_text": " "}, "belief_text", "is whitespace-only"),
    ({"rejected_belief_text": ""}, "rejected_belief_text", "is empty"),
    ({"belief_text": "a > b"}, "belief_text",
     "must not contain '>' (the first '>' closes the belief prefix)"),
    ({"chosen": " Tea is awful."}, "chosen", "is identical to rejected"),
    ({"group": [1]}, "group", "must be a string or an integer, got list"),
])
def test_gdpo_errors(change, field, message):
    assert problems_of({**EXAMPLES["gdpo"], **change}, "gdpo")[field] == message


def test_gdpo_missing_fields_are_named():
    problems = problems_of({"prompt": "p", "target": [0.5, 0.5]}, "gdpo")
    assert {f for f, m in problems.items() if m == "missing field"} == {
        "belief", "belief_text", "chosen", "rejected", "rejected_belief", "rejected_belief_text"}


@pytest.mark.skipif(not HH.exists(), reason=f"shared Anthropic HH file not found at {HH}")
def test_shared_anthropic_hh_file_loads_as_implicit():
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        originals = [json.loads(line) for line in f]
    data = load_rows(HH)
    assert data.format == "implicit" and len(data.rows) == len(originals) == 2312
    for row, original in zip(data.rows, originals):
        assert row["prompt"].endswith("\n\nAssistant:")
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]
        assert row["chosen"] != row["rejected"]
