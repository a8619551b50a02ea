"""Loop prompts: what a prompt is in memory and in the loop's tables, and the prompt of any data row.

A loop prompt (`Prompt`) is either a `str` (raw text, tokenized as is) or a list of `{role, content}`
messages (a conversation the model answers next; rendered by the stage that tokenizes it, with the
tokenizer's chat template and its generation prompt). In the loop's tables (the frames the stages pass to
Ray Data, Parquet artifacts) a prompt is written and read by `rayalign.templating.prompt_columns` /
`prompt_values`, next to the one tokenization that renders it. `prompt_of` gives the prompt
of a validated data record of any format (pairs included), which is how `load_rows(as_prompts=True)` lets
any preference or prompt source feed the loop. Nothing here tokenizes.
"""

from __future__ import annotations

from rayalign.data.chat import check_messages, split_implicit_conversation

Prompt = str | list[dict[str, str]]
ITERATION_PROMPT_ID = 1_000_000  # iteration i's k-th prompt has id i * ITERATION_PROMPT_ID + k
EVAL_PROMPT_ID = 10**9  # evaluation prompts keep these ids (so the same seeds) for every model
PROMPT_MESSAGES = "prompt_messages"  # the table column holding a message prompt as JSON


def prompt_of(record: dict, fmt: str, row: dict) -> Prompt:
    """The prompt of a valid `record` of format `fmt` (`row` is its normalized row): the text for string
    formats, the prompt's messages (not rendered) for `formats.CONVERSATIONAL_FORMATS`."""
    if fmt == "conversational":
        return check_messages(record["prompt"], "prompt", [])
    if fmt == "ultrafeedback":
        return check_messages(record["chosen"], "chosen", [])[:-1]
    if fmt == "implicit_conversational":
        chosen, rejected = (check_messages(record[k], k, []) for k in ("chosen", "rejected"))
        return split_implicit_conversation(chosen, rejected)[0]
    return row["prompt"]  # string formats, and the prompt formats' own rows (text or messages)
