"""Pair tokenization: separate prompt/completion encoding, EOS, truncation sides, right padding."""

from __future__ import annotations

import pytest

from rayalign.batching import collate_pairs, encode_pair


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from rayalign.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def test_encode_pair_appends_eos_and_reports_no_truncation(tokenizer):
    e = encode_pair(tokenizer, "\n\nHuman: hi\n\nAssistant:", " great", " awful",
                    max_prompt_length=64, max_completion_length=64)
    assert e["prompt_ids"] == tokenizer("\n\nHuman: hi\n\nAssistant:", add_special_tokens=False)["input_ids"]
    assert e["chosen_ids"][-1] == tokenizer.eos_token_id == e["rejected_ids"][-1]
    assert not e["prompt_truncated"] and not e["completion_truncated"]


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    prompt = "\n\nHuman: " + "one two three four five six seven eight nine ten " * 5 + "\n\nAssistant:"
    full_prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chosen = " the story was great and the music was lovely and the ending was moving"
    full_chosen = tokenizer(chosen, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    e = encode_pair(tokenizer, prompt, chosen, " bad", max_prompt_length=5, max_completion_length=4)
    assert e["prompt_ids"] == full_prompt[-5:]
    assert e["chosen_ids"] == full_chosen[:4]
    assert e["prompt_truncated"] and e["completion_truncated"]


def test_collate_right_pads_to_one_length_with_exact_masks(tokenizer):
    a = {"prompt_ids": [5, 6], "chosen_ids": [7, 0], "rejected_ids": [8, 9, 0]}
    b = {"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [0]}
    batch = collate_pairs([a, b], pad_token_id=0)
    assert batch["chosen_input_ids"].tolist() == [[5, 6, 7, 0, 0], [5, 7, 0, 0, 0]]
    assert batch["rejected_input_ids"].tolist() == [[5, 6, 8, 9, 0], [5, 0, 0, 0, 0]]
    assert batch["chosen_attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert batch["chosen_completion_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]
    # pad == eos: the real EOS at the end of a completion stays in both masks.
    assert batch["rejected_completion_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
