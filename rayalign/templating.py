"""Prompt + completion -> rendered text -> token ids: the one tokenization every stage uses.

Generation (HF and vLLM), the judge, reference scoring, training, evaluation and SFT all tokenize through
`prompt_ids` / `completion_ids` (`encode_prompt_completion` is both at once), so a prompt + completion
has the same token ids in every stage. A prompt is a string or a list of `{role, content}` messages:

- A **string** prompt is raw text, tokenized as is (no template, no special tokens added); its string
  completion is raw text too, followed by the tokenizer's eos (unless it already ends with it).
- A **conversational** prompt is rendered with the tokenizer's chat template, `add_generation_prompt=True`
  (`rayalign.data.chat.render_prompt`). Its completion, an assistant message's content (a string: what
  the generator sampled) or a list of messages, is what the template puts after that prompt for those
  turns (`rayalign.data.chat.render_completion`): ChatML gives "{content}<|im_end|>\\n".
- Rendering never tokenizes: the ids are `tokenizer(text, add_special_tokens=False)` of the rendered
  text, exactly what `apply_chat_template(tokenize=True)` gives (the template writes its own BOS).

So the ids of a conversational (prompt, completion) equal those of the string pair (`render_prompt`,
`render_completion`): the data loader renders conversational rows to these strings and the judge writes
its pairs as them, and both tokenize to the same ids as the live messages do.

**The end of a completion** is the tokenizer's eos token, the token generation stops at. The ids of a
completion text end right after its last eos when only whitespace follows it (a template's separator
after its end-of-turn, ChatML's "\\n"), else eos is appended. A sampled completion ("It was great" then
"<|im_end|>") and the template's rendering of that assistant turn ("It was great.<|im_end|>\\n") thus get
the same ids, ending at "<|im_end|>". TRL 1.16 keeps that "\\n" in a conversational completion; here it is
dropped, because the generator never produces it (it stops at eos) and the judge and the trainer must see
what was sampled. A template whose end-of-turn token is not the tokenizer's eos gets eos appended after it.

**Text, not sampled ids, crosses stages.** The generator returns the sampled ids, their log-probs and the
decoded text; every later stage (judge, reference, training, evaluation) re-tokenizes (prompt, text) here.
The generator conditions on `prompt_ids` of the same prompt and stops at the same eos, so its sampled ids
are the downstream ids whenever the model sampled the tokenizer's own tokenization of its text (what a
trained model almost always does); otherwise (a random model, say) judge and trainer still agree exactly
with each other, on the canonical tokenization, and only the generator's own `logprobs` column describes a
different token sequence. A "length"-finished sample gets eos appended downstream, as any string
completion does. Re-tokenizing keeps every artifact a plain data file (the judged pairs train like a user's
pairs, with no id columns to keep in sync with their text).

**Frames.** Loop prompt frames and sample files carry a prompt in two columns (`prompt_columns`,
`prompt_value`): `prompt` (the string, or the messages as JSON text) and `prompt_messages` (True for a
message list; a frame without the column holds strings only).

This module does not load models or read data files; it loads a tokenizer only in `check_prompts_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rayalign.config import ConfigError

Messages = list[dict[str, str]]
Prompt = str | Messages
Completion = str | Messages  # an assistant message's content, or the completion's messages
MESSAGES_COLUMN = "prompt_messages"  # bool column: `prompt` holds a JSON message list
# Data formats whose rows are message lists, rendered with the tokenizer's chat template when loaded.
CONVERSATIONAL_FORMATS = ("conversational", "ultrafeedback")


def as_prompt(value: Any) -> Prompt:
    """A prompt as a plain `str` or list of `{role, content}` dicts (from a list, tuple or Arrow array)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # numpy / Arrow arrays of message structs, as pandas hands them over
        value = value.tolist()
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise TypeError(f"a prompt must be a string or a non-empty list of {{role, content}} messages, "
                    f"got {type(value).__name__}")


def is_messages(prompt: Prompt) -> bool:
    return not isinstance(prompt, str)


def prompt_columns(prompts: Sequence[Any]) -> dict[str, list]:
    """Frame columns for `prompts` (strings and/or message lists): {"prompt": [...], "prompt_messages": [...]}.

    A message list is stored as JSON text in `prompt`, so Ray Data and Parquet see one string column. Without
    any message list the flag column is left out: text-only frames and artifacts keep their columns.
    """
    values = [as_prompt(p) for p in prompts]
    if not any(is_messages(p) for p in values):
        return {"prompt": values}
    return {"prompt": [json.dumps(p, ensure_ascii=False) if is_messages(p) else p for p in values],
            MESSAGES_COLUMN: [is_messages(p) for p in values]}


def prompt_value(row: Any) -> Prompt:
    """The prompt of a frame row (a dict, a pandas row or a namedtuple) written by `prompt_columns`."""
    get = row.get if isinstance(row, Mapping) or hasattr(row, "get") else lambda k, d=None: getattr(row, k, d)
    prompt = get("prompt")
    return as_prompt(json.loads(prompt)) if messages_flag(get(MESSAGES_COLUMN, False)) else as_prompt(prompt)


def messages_flag(value: Any) -> bool:
    """A `prompt_messages` cell as a bool: None, and NaN (a row of a concatenated frame that lacked the
    column), mean a string prompt."""
    return value is not None and value == value and bool(value)


def prompt_values(frame: Any) -> list[Prompt]:
    """`prompt_value` of every row of a pandas frame (one without `prompt_messages` holds strings)."""
    flags = frame[MESSAGES_COLUMN] if MESSAGES_COLUMN in frame else [False] * len(frame)
    return [prompt_value({"prompt": p, MESSAGES_COLUMN: f}) for p, f in zip(frame["prompt"], flags)]


def has_chat_template(tokenizer: Any) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def no_template_message(name: str) -> str:
    return (f"the tokenizer {name} has no chat template to render them; use a model (or model.tokenizer) "
            "whose tokenizer has one, or string prompts and completions")


def require_chat_template(tokenizer: Any, *, key: str, source: str, name: str) -> None:
    """Config-time check: one-line ConfigError naming `key` and `source` (the data holding message lists)
    when `tokenizer` (called `name`) has no chat template."""
    if not has_chat_template(tokenizer):
        raise ConfigError(f"{key}: {source} holds message lists, but {no_template_message(name)}")


def check_data_template(tokenizer: Any, fmt: str, *, key: str, source: str, name: str) -> None:
    """`require_chat_template` for a loaded data file of format `fmt` when it is conversational.

    `tokenizer=None` (no model given: the tiny model is built from the data) passes: rows then render with
    `rayalign.data.chat`'s "\n\nHuman:/\n\nAssistant:" fallback, which is that tiny model's own template."""
    if tokenizer is not None and fmt in CONVERSATIONAL_FORMATS:
        require_chat_template(tokenizer, key=key, source=source, name=name)


def check_prompts_template(prompts: Sequence[Any], tokenizer_path: str, *, key: str = "data.prompts_file",
                           source: str = "", load=None) -> None:
    """Config-time check of loop prompts: when any is a message list, the tokenizer of `tokenizer_path` (the
    model that generates and judges) must have a chat template. Loads it only then (`load`: the run's
    `rayalign.models.LoadOptions`)."""
    if not any(is_messages(as_prompt(p)) for p in prompts):
        return
    from rayalign.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path, load)
    require_chat_template(tokenizer, key=key, source=source or "the prompts", name=tokenizer_path)


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """A string prompt as is; messages through the chat template with the generation prompt."""
    from rayalign.data.chat import render_prompt as render

    if not is_messages(prompt):
        return prompt
    _need_template(tokenizer)
    return render(prompt, tokenizer)


def render_completion(tokenizer: Any, prompt: Prompt, completion: Completion,
                      prompt_text: str | None = None) -> str:
    """The completion text after `prompt`: raw text for a string prompt; for a conversational one, what the
    template renders after the prompt for the completion's turns (a string: one assistant message)."""
    from rayalign.data.chat import render_completion as render

    if not is_messages(prompt):
        if not isinstance(completion, str):
            raise ValueError("a message-list completion needs a message-list prompt")
        return completion
    _need_template(tokenizer)
    turns = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else as_prompt(completion)
    if prompt_text is None:
        prompt_text = render_prompt(tokenizer, prompt)
    return render(prompt, turns, prompt_text, tokenizer)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_at_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """Completion ids ending at eos: cut after the last eos if only whitespace follows it, else append eos."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        end = len(ids) - ids[::-1].index(eos)
        if not tokenizer.decode(ids[end:], skip_special_tokens=False).strip():
            return ids[:end]
    return ids + [eos]


def prompt_ids(tokenizer: Any, prompt: Prompt, max_length: int | None = None,
               prompt_text: str | None = None) -> tuple[list[int], bool]:
    """Ids of the rendered prompt, cut to its last `max_length` (None: all); and whether it was cut."""
    ids = text_ids(tokenizer, render_prompt(tokenizer, prompt) if prompt_text is None else prompt_text)
    if max_length is None:
        return ids, False
    return ids[-max_length:], len(ids) > max_length


def completion_ids(tokenizer: Any, prompt: Prompt, completion: Completion, max_length: int | None = None,
                   prompt_text: str | None = None) -> tuple[list[int], bool]:
    """Ids of the rendered completion ending at eos (`end_at_eos`), cut to its first `max_length`; and
    whether it was cut. `prompt_text`: `render_prompt(tokenizer, prompt)` if the caller has it already."""
    ids = end_at_eos(tokenizer, text_ids(tokenizer, render_completion(tokenizer, prompt, completion, prompt_text)))
    if max_length is None:
        return ids, False
    return ids[:max_length], len(ids) > max_length


def encode_prompt_completion(tokenizer: Any, prompt: Prompt, completion: Completion, *,
                             max_prompt_length: int | None = None,
                             max_completion_length: int | None = None) -> dict:
    """{prompt_ids, completion_ids, prompt_truncated, completion_truncated} of one (prompt, completion)."""
    text = render_prompt(tokenizer, prompt)
    p, p_cut = prompt_ids(tokenizer, prompt, max_prompt_length, prompt_text=text)
    c, c_cut = completion_ids(tokenizer, prompt, completion, max_completion_length, prompt_text=text)
    return {"prompt_ids": p, "completion_ids": c, "prompt_truncated": p_cut, "completion_truncated": c_cut}


def _need_template(tokenizer: Any) -> None:
    # tokenizer=None renders with chat.py's documented HH fallback (the tiny model built from the data has
    # exactly that template); a real tokenizer without a template is refused rather than guessed at.
    if tokenizer is not None and not has_chat_template(tokenizer):
        raise ValueError("a prompt is a list of messages, but "
                         + no_template_message(getattr(tokenizer, "name_or_path", "") or "given"))
