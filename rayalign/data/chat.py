"""Conversational rows to text: validate `{role, content}` message lists and render them as prompt/completion.

With a tokenizer that has a chat template, the prompt is `apply_chat_template(prompt, add_generation_prompt=
True)` and a completion is the rendering of prompt + completion messages minus that rendered prompt. When
the template does not render the conversation with the prompt as a prefix (some templates change earlier
turns, e.g. strip reasoning, once more turns follow) the row is rejected with a clear message rather than
split at a wrong place.

Fallback template (no tokenizer, or one without `chat_template`): every message renders as
"\\n\\n{Role}: {content}" with Role "Human" for user, "Assistant" for assistant, "System" for system and the
capitalised role name otherwise, and the generation prompt is "\\n\\nAssistant:". That is the Anthropic HH
layout, so a conversation gives the same text as HH-style implicit rows, and a completion renders as
" {content}" (the leading space belongs to the completion, as in HH).

Rendered text may contain template special tokens (a BOS, say); tokenizing it without adding special tokens
again is the tokenizing stage's concern, not this module's. This module does not tokenize.
"""

import os
from typing import Any

from rayalign.data.errors import type_name

FALLBACK_ROLES = {"user": "Human", "assistant": "Assistant", "system": "System"}
FALLBACK_GENERATION_PROMPT = "\n\nAssistant:"

Problems = list[tuple[str, str]]  # (field, message) pairs, collected per row


def check_messages(value: Any, field: str, problems: Problems) -> list[dict[str, str]] | None:
    """Return the messages as plain `{role, content}` dicts, or None after recording what is wrong."""
    if not isinstance(value, list):
        problems.append((field, f"must be a list of {{role, content}} messages, got {type_name(value)}"))
        return None
    if not value:
        problems.append((field, "is empty (no messages)"))
        return None
    messages, ok = [], True
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"must be a {{role, content}} object, got {type_name(message)}"))
            ok = False
            continue
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            problems.append((f"{where}.role", f"must be a non-empty string, got {type_name(role)} {role!r}"))
            ok = False
        if not isinstance(content, str):
            problems.append((f"{where}.content", f"must be a string, got {type_name(content)}"))
            ok = False
        if ok:
            messages.append({"role": role, "content": content})
    return messages if ok else None


class ImplicitPromptError(ValueError):
    """Why a conversation pair has no implicit prompt; `field` is the field to report it under."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def split_implicit_conversation(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """(prompt, chosen completion, rejected completion) of two whole conversations, as TRL's `extract_prompt`:
    the prompt is their longest common leading run of whole turns. Raises `ImplicitPromptError` when they
    share no turn, when either side has no turn left (its completion would be empty; TRL would instead cut
    one turn earlier), or when a completion does not start with the assistant's turn."""
    if chosen == rejected:
        raise ImplicitPromptError("chosen", "is identical to rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise ImplicitPromptError("prompt", "chosen and rejected share no leading turn, so there is no implicit "
                                            "prompt (their first turns differ)")
    sides = (("chosen", chosen), ("rejected", rejected))
    for name, messages in sides:
        if len(messages) == shared:
            raise ImplicitPromptError(name, f"has no turn after the {shared} it shares with the other side (the "
                                            "implicit prompt): its completion would be empty")
    for name, messages in sides:
        if messages[shared]["role"] != "assistant":
            raise ImplicitPromptError(name, f"its first turn after the {shared} shared ones (the implicit prompt) "
                                            f"is {messages[shared]['role']!r}; a completion starts with the "
                                            "assistant's turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def render_prompt(messages: list[dict[str, str]], tokenizer: Any = None) -> str:
    """The prompt text, ending with the generation prompt (the assistant's turn opener)."""
    if not _has_template(tokenizer):
        return _render_fallback(messages) + FALLBACK_GENERATION_PROMPT
    return _apply_template(tokenizer, messages, add_generation_prompt=True)


def render_completion(
    prompt_messages: list[dict[str, str]],
    completion_messages: list[dict[str, str]],
    prompt_text: str,
    tokenizer: Any = None,
) -> str:
    """The completion text: rendering of prompt + completion minus `prompt_text`; ValueError on no prefix."""
    conversation = prompt_messages + completion_messages
    if _has_template(tokenizer):
        full = _apply_template(tokenizer, conversation, add_generation_prompt=False)
        source = "the chat template's"
    else:
        full = _render_fallback(conversation)
        source = "the fallback template's"
    if not full.startswith(prompt_text):
        at = len(os.path.commonprefix([full, prompt_text]))
        raise ValueError(
            f"{source} rendering of prompt+completion does not start with the rendered prompt "
            f"(they differ at character {at}: {prompt_text[at:at + 30]!r} vs {full[at:at + 30]!r}); "
            "is the completion's first message from the assistant?"
        )
    return full[len(prompt_text):]


def _has_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(tokenizer.chat_template)


def _render_fallback(messages: list[dict[str, str]]) -> str:
    parts = []
    for m in messages:
        role = FALLBACK_ROLES.get(m["role"], m["role"].capitalize())
        parts.append(f"\n\n{role}: {m['content']}")
    return "".join(parts)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - a user's Jinja template can raise anything; report it per row
        raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from e
