"""Loop prompts: what a prompt is in memory and in the loop's tables, and the prompt of any data row.

A loop prompt (`Prompt`) is either a `str` (raw text, tokenized as is) or a list of `{role, content}`
messages (a conversation the model answers next; rendered by the stage that tokenizes it, with the
tokenizer's chat template and its generation prompt). In a table (the pandas frames the stages pass to Ray
Data, Parquet artifacts) a prompt takes two columns:

    prompt            str: the text; for a message prompt its fallback rendering (`chat.render_prompt`
                      without a tokenizer: "\\n\\nHuman: ...\\n\\nAssistant:"), for logs and for stages that
                      read text only
    prompt_messages   str: the prompt as JSON, `json.dumps(prompt)`: a list of messages, or a JSON string
                      for a text prompt in a table that mixes both (never null, so Parquet and pandas keep
                      one string column). The column is left out when no prompt of the table has messages,
                      so text-only tables keep their columns as before.

`prompt_columns` writes these columns, `prompt_from_row` reads one row back. `prompt_of` gives the prompt
of a validated data record of any format (pairs included), which is how `load_rows(as_prompts=True)` lets
any preference or prompt source feed the loop. Nothing here tokenizes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from rayalign.data.chat import check_messages, render_prompt, split_implicit_conversation

Prompt = str | list[dict[str, str]]
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


def prompt_text(prompt: Prompt) -> str:
    """A prompt as text: itself, or a message prompt's fallback rendering."""
    return prompt if isinstance(prompt, str) else render_prompt(prompt)


def prompt_columns(prompts: Sequence[Prompt]) -> dict[str, list]:
    """The table columns of `prompts`: `prompt`, plus `prompt_messages` when any prompt is messages."""
    columns: dict[str, list] = {"prompt": [prompt_text(p) for p in prompts]}
    if any(not isinstance(p, str) for p in prompts):
        columns[PROMPT_MESSAGES] = [json.dumps(p) for p in prompts]
    return columns


def prompt_from_row(row: Mapping) -> Prompt:
    """The prompt of a table row written by `prompt_columns` (a dict, a pandas row or namedtuple `_asdict`)."""
    messages = row.get(PROMPT_MESSAGES)
    if isinstance(messages, str):
        return json.loads(messages)
    return row["prompt"]
