"""TRL implicit-prompt conversations, message prompts and the loop-prompt columns, one record at a time.

Pure: no model, no Ray; a temporary .jsonl for the `FILE:ROW: FIELD` and `data check` lines. Expected
splits are TRL's `extract_prompt` results worked by hand (longest common leading run of whole turns).
"""

import io
import json

import pandas as pd
import pytest

from rayalign.data import DataValidationError, detect_format, load_rows, normalize_row
from rayalign.data.chat import ImplicitPromptError, split_implicit_conversation
from rayalign.data.check import run_data_check
from rayalign.data.readers import write_rows_parquet
from rayalign.templating import prompt_columns, prompt_values


def turn(role, content):
    return {"role": role, "content": content}


U1, A1, U2 = turn("user", "What color is the sky?"), turn("assistant", "Blue."), turn("user", "And at night?")
TRL_EXAMPLE = {"chosen": [U1, turn("assistant", "It is blue.")], "rejected": [U1, turn("assistant", "It is green.")]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_trl_documentation_example_splits_after_the_shared_user_turn():
    assert detect_format(TRL_EXAMPLE) == "implicit_conversational"
    assert split_implicit_conversation(TRL_EXAMPLE["chosen"], TRL_EXAMPLE["rejected"]) == (
        [U1], [turn("assistant", "It is blue.")], [turn("assistant", "It is green.")])
    row, problems = normalize_row(TRL_EXAMPLE, "implicit_conversational")
    assert problems == []
    assert row == {"prompt": "\n\nHuman: What color is the sky?\n\nAssistant:", "chosen": " It is blue.",
                   "rejected": " It is green."}


def test_multi_turn_prompt_and_completions_of_several_turns():
    system = turn("system", "Be brief.")
    chosen = [system, U1, A1, U2, turn("assistant", "Black.")]
    rejected = [system, U1, A1, U2, turn("assistant", "Dark."), turn("user", "Sure?"), turn("assistant", "Yes.")]
    prompt, c, r = split_implicit_conversation(chosen, rejected)
    assert (prompt, c, r) == (chosen[:4], chosen[4:], rejected[4:])
    row, _ = normalize_row({"chosen": chosen, "rejected": rejected, "score_chosen": 2, "id": "x"},
                           "implicit_conversational")
    assert row == {"prompt": "\n\nSystem: Be brief.\n\nHuman: What color is the sky?\n\nAssistant: Blue."
                             "\n\nHuman: And at night?\n\nAssistant:",
                   "chosen": " Black.", "rejected": " Dark.\n\nHuman: Sure?\n\nAssistant: Yes.",
                   "score_chosen": 2.0, "id": "x"}


@pytest.mark.parametrize("chosen, rejected, field, message", [
    ([turn("user", "a"), A1], [turn("user", "b"), A1], "prompt", "share no leading turn"),
    ([U1, A1], [U1, A1], "chosen", "is identical to rejected"),
    ([U1, A1], [U1, A1, U2, A1], "chosen", "has no turn after the 2 it shares with the other side"),
    ([U1, A1, U2], [U1, A1], "rejected", "has no turn after the 2"),
    ([U1, A1, U2, A1], [U1, A1, turn("user", "other"), A1], "chosen", "is 'user'; a completion starts with"),
])
def test_rows_without_an_implicit_prompt_are_errors(chosen, rejected, field, message):
    with pytest.raises(ImplicitPromptError, match=message) as caught:
        split_implicit_conversation(chosen, rejected)
    assert caught.value.field == field
    row, problems = normalize_row({"chosen": chosen, "rejected": rejected}, "implicit_conversational")
    assert row is None and [f for f, m in problems if message in m] == [field]


def test_file_errors_are_file_row_field_lines_and_data_check_names_the_format(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [TRL_EXAMPLE, {"chosen": [U1, A1], "rejected": [U1, U2, A1]}])
    with pytest.raises(DataValidationError) as caught:
        load_rows(good)
    assert [str(e) for e in caught.value.errors] == [
        f"{good}:2: rejected: its first turn after the 1 shared ones (the implicit prompt) is 'user'; a completion "
        "starts with the assistant's turn"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [TRL_EXAMPLE, {"chosen": [A1], "rejected": [U1, A1]},
                                               {"chosen": [U1, {"role": "assistant"}], "rejected": [U1, A1]}])
    out = io.StringIO()
    assert run_data_check(str(bad), out=out) == 2
    assert out.getvalue().splitlines() == [
        f"{bad}:2: prompt: chosen and rejected share no leading turn, so there is no implicit prompt (their first "
        "turns differ)",
        f"{bad}:3: chosen[1].content: must be a string, got null"]
    out = io.StringIO()
    assert run_data_check(str(write_jsonl(tmp_path / "ok.jsonl", [TRL_EXAMPLE] * 2)), out=out) == 0
    assert out.getvalue().splitlines()[1:3] == ["format: implicit_conversational", "rows: 2"]


def test_message_prompts_keep_their_messages():
    assert normalize_row({"prompt": [U1]}, "conversational_prompt_only") == ({"prompt": [U1]}, [])
    # `messages` rows (TRL language modeling; UltraFeedback's *_gen splits also hold a prompt string and id)
    record = {"prompt": "ignored", "prompt_id": "abc", "messages": [U1, A1, U2, A1, turn("assistant", "more")]}
    assert detect_format(record) == "messages"
    assert normalize_row(record, "messages") == ({"prompt": [U1, A1, U2]}, [])
    assert normalize_row({"messages": [U1]}, "messages") == ({"prompt": [U1]}, [])


@pytest.mark.parametrize("record, fmt, problem", [
    ({"messages": [A1, A1]}, "messages", ("messages", "has only assistant turns")),
    ({"messages": []}, "messages", ("messages", "is empty (no messages)")),
    ({"messages": "hi"}, "messages", ("messages", "must be a list of {role, content} messages, got string")),
    ({"prompt": [U1, A1]}, "conversational_prompt_only", ("prompt", "ends with an assistant turn")),
    ({"prompt": [turn("user", " ")]}, "conversational_prompt_only", ("prompt", "is empty (its messages have no")),
    ({"prompt": [{"role": "user"}]}, "conversational_prompt_only", ("prompt[0].content", "must be a string")),
])
def test_message_prompt_errors(record, fmt, problem):
    row, problems = normalize_row(record, fmt)
    assert row is None and len(problems) == 1
    assert problems[0][0] == problem[0] and problems[0][1].startswith(problem[1])


def test_any_format_gives_loop_prompts(tmp_path):
    ultrafeedback = {"prompt": "hi", "chosen": [turn("user", "hi"), A1], "rejected": [turn("user", "hi"), U2 | {
        "role": "assistant"}], "score_chosen": 9, "score_rejected": 1}
    cases = {
        "explicit": ([{"prompt": "Q?", "chosen": " a", "rejected": " b"}], ["Q?"]),
        "implicit": ([{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}],
                     ["\n\nHuman: q\n\nAssistant:"]),
        "conversational": ([{"prompt": [U1], "chosen": [A1], "rejected": [U2 | {"role": "assistant"}]}], [[U1]]),
        "implicit_conversational": ([TRL_EXAMPLE], [[U1]]),
        "ultrafeedback": ([ultrafeedback], [[turn("user", "hi")]]),
        "prompt_only": ([{"prompt": "P"}], ["P"]),
        "messages": ([{"messages": [U1, A1]}], [[U1]]),
    }
    for fmt, (records, prompts) in cases.items():
        data = load_rows(write_jsonl(tmp_path / f"{fmt}.jsonl", records), as_prompts=True)
        assert (data.format, data.rows) == (fmt, [{"prompt": p} for p in prompts])


def test_prompt_columns_round_trip_through_parquet(tmp_path):
    prompts = ["plain text", [turn("system", "Be brief."), U1]]
    columns = prompt_columns(prompts)
    assert columns == {"prompt": ["plain text", json.dumps(prompts[1])], "prompt_messages": [False, True]}
    path = tmp_path / "p.parquet"
    write_rows_parquet(pd.DataFrame({"prompt_id": [1, 2], **columns}).to_dict("records"), path)
    assert prompt_values(pd.read_parquet(path)) == prompts


def test_implicit_conversations_render_with_the_chat_template():
    from tests.test_data_chat import TEMPLATE, build_tokenizer

    row, problems = normalize_row(TRL_EXAMPLE, "implicit_conversational", build_tokenizer(TEMPLATE))
    assert problems == []
    assert row == {"prompt": "<|user|>What color is the sky?\n<|assistant|>", "chosen": "It is blue.\n",
                   "rejected": "It is green.\n"}
