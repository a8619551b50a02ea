"""Conversational rows rendered with a real chat template, and token statistics in `data check`.

Builds a tiny byte-level BPE tokenizer in a temporary directory (no downloads; HF_HUB_OFFLINE=1 via
conftest). The fallback template without a tokenizer is covered in test_data_formats.py.
"""

import io
import json

import pytest

from rayalign.data import DataValidationError, load_rows, normalize_row
from rayalign.data.check import run_data_check

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CONVERSATION = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "hello"}],
    "rejected": [{"role": "assistant", "content": "go away"}],
}
TEXTS = ["What is 2+2?", " 4", " 5", "Capital of France?", " Paris", " Lyon", "hello there, general"]


def build_tokenizer(chat_template=None):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS * 20, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEMPLATE).save_pretrained(path)
    return path


def test_conversational_rows_use_the_chat_template():
    row, problems = normalize_row(CONVERSATION, "conversational", build_tokenizer(TEMPLATE))
    assert problems == []
    assert row == {"prompt": "<|user|>hi\n<|assistant|>", "chosen": "hello\n", "rejected": "go away\n"}


def test_ultrafeedback_rows_use_the_chat_template():
    record = {"prompt": "hi", "chosen": CONVERSATION["prompt"] + CONVERSATION["chosen"],
              "rejected": CONVERSATION["prompt"] + CONVERSATION["rejected"], "score_chosen": 9}
    row, _ = normalize_row(record, "ultrafeedback", build_tokenizer(TEMPLATE))
    assert row == {"prompt": "<|user|>hi\n<|assistant|>", "chosen": "hello\n", "rejected": "go away\n",
                   "score_chosen": 9.0}


def test_tokenizer_without_template_falls_back_to_hh_layout():
    row, _ = normalize_row(CONVERSATION, "conversational", build_tokenizer(None))
    assert row["prompt"] == "\n\nHuman: hi\n\nAssistant:" and row["chosen"] == " hello"


def test_template_whose_prompt_is_not_a_prefix_fails_clearly():
    template = TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    _, problems = normalize_row(CONVERSATION, "conversational", build_tokenizer(template))
    assert [f for f, _ in problems] == ["chosen", "rejected"]
    expected = ("the chat template's rendering of prompt+completion does not start with the rendered prompt "
                "(they differ at character 24: '\\n' vs 'hello\\n')")
    assert problems[0][1].startswith(expected)


def test_template_that_raises_is_a_row_error(tmp_path):
    tok = build_tokenizer("{{ raise_exception('only user turns, please') }}")
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    with pytest.raises(DataValidationError) as e:
        load_rows(path, tokenizer=tok)
    (error,) = e.value.errors
    assert (error.row, error.field) == (1, "prompt")
    assert "the chat template failed" in error.message and "only user turns, please" in error.message


def test_check_prints_token_statistics(tmp_path, tokenizer_dir):
    rows = [{"prompt": "What is 2+2?", "chosen": " 4", "rejected": " 5"},
            {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = io.StringIO()
    assert run_data_check(str(path), tokenizer=str(tokenizer_dir), out=out) == 0
    lines = out.getvalue().splitlines()
    start = lines.index(f"tokens ({tokenizer_dir}):")
    tok = build_tokenizer()
    for offset, field in enumerate(("prompt", "chosen", "rejected"), start=2):
        counts = [len(tok(r[field], add_special_tokens=False)["input_ids"]) for r in rows]
        mean = f"{sum(counts) / 2:.1f}"  # two rows: the median is the mean
        assert lines[start + offset].split() == [field, str(min(counts)), mean, mean, str(max(counts))]


def test_check_renders_conversations_with_the_saved_template(tmp_path, tokenizer_dir):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(CONVERSATION) + "\n")
    out = io.StringIO()
    assert run_data_check(str(path), tokenizer=str(tokenizer_dir), out=out) == 0
    lines = out.getvalue().splitlines()
    assert "format: conversational" in lines
    prompt_chars = next(x for x in lines if x.startswith("  prompt")).split()
    assert prompt_chars[1] == str(len("<|user|>hi\n<|assistant|>"))


def test_check_reports_an_unloadable_tokenizer(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Q"}) + "\n")
    out = io.StringIO()
    assert run_data_check(str(tmp_path / "p.jsonl"), tokenizer=str(tmp_path / "no-tok"), out=out) == 2
    assert out.getvalue().startswith(f"{tmp_path / 'no-tok'}:0: -: cannot load tokenizer: ")
