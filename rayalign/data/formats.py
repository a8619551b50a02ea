"""Row formats: detect which format a raw record is in, validate it, and normalize it to canonical fields.

Formats (`FORMATS`) and the normalized rows they give (plain dicts; an optional "id", string or int, is kept):
- "explicit": TRL standard `{prompt, chosen, rejected}` strings            -> {prompt, chosen, rejected}
- "implicit": TRL implicit prompt `{chosen, rejected}` full texts (e.g. raw Anthropic HH); the prompt is the
  longest common prefix cut back to the end of its last "\\n\\nAssistant:". If the common prefix has no
  "\\n\\nAssistant:", it is cut back to the start of its last whitespace run, so both completions begin
  with whitespace as in HH (" Sure..."); a prefix without whitespace is an error. A remainder may be
  empty or whitespace-only (HH has such replies); the `data check` command counts them.
- "conversational": TRL conversational, prompt/chosen/rejected as `{role, content}` message lists, rendered
  by `chat.py` (the tokenizer's chat template, else a documented fallback)  -> {prompt, chosen, rejected}
- "implicit_conversational": TRL implicit-prompt conversational `{chosen, rejected}`, each a whole
  conversation (no `prompt`). As TRL's `extract_prompt`, the prompt is the longest common leading run of
  whole turns and the completions are the rest; rendered as "conversational". Errors: no shared turn, a
  side with no turn left after the shared ones (an empty completion), a completion whose first turn is not
  the assistant's (`chat.split_implicit_conversation`).              -> {prompt, chosen, rejected}
- "ultrafeedback": `prompt` string, chosen/rejected message lists (user turn(s) + final assistant turn).
  The rendered prompt comes from the messages before the final turn (which must be the same in chosen and
  rejected); the `prompt` string is only checked to be non-empty text.   -> {prompt, chosen, rejected}
- "prompt_only": `{prompt}` string for generation                           -> {prompt: str}
- "conversational_prompt_only": `{prompt}` as a message list (TRL conversational prompt-only); its last
  turn must not be the assistant's                                        -> {prompt: [messages]}
- "messages": `{messages}` (TRL conversational language modeling, e.g. UltraFeedback's `*_gen` splits),
  as a prompt: the trailing assistant turn(s) are dropped; a `prompt` string next to it is ignored
                                                                           -> {prompt: [messages]}
  Prompt rows keep their messages (not rendered): the stage that tokenizes renders them.
- "k_sample": `{prompt, completions: [K], rewards: [K]}`, K >= 2, finite rewards -> same fields. Individual
  completions may be empty strings (a model may sample an empty answer).
- "gdpo": ALGORITHMS.md §3 -> prompt, target, belief, belief_text, chosen, rejected, rejected_belief,
  rejected_belief_text (+ group). Beyond the spec's checks, the belief must have target > 0 (beliefs are
  drawn from the target), rejected_belief must differ from belief, L = len(target) must be 2..10 (levels
  are single digits), and belief texts must not contain ">" (the first ">" closes the belief prefix).
All pair formats keep optional finite-number "score_chosen"/"score_rejected" and "ref_chosen_logps"/
"ref_rejected_logps" (as floats; the last two, TRL's names, are reference log-probs precomputed for the row,
which training reads only when its stage says they are its reference's; k_sample keeps "ref_logps", K
numbers, likewise). A field whose
value is None/null counts as absent (Parquet and `datasets` fill missing columns with None). Fields not
listed are dropped. Every problem is recorded as a (field, message) pair; nothing is "fixed" silently.

This module works on one record at a time; reading files is `readers.py`, whole-file logic `load.py`.
"""

import math
import re
from collections.abc import Callable
from typing import Any

from rayalign.data.chat import (
    ImplicitPromptError,
    Problems,
    check_messages,
    render_completion,
    render_prompt,
    split_implicit_conversation,
)
from rayalign.data.errors import type_name

FORMATS = ("explicit", "implicit", "conversational", "implicit_conversational", "ultrafeedback", "prompt_only",
           "conversational_prompt_only", "messages", "k_sample", "gdpo")
PAIR_FORMATS = ("explicit", "implicit", "conversational", "implicit_conversational", "ultrafeedback")
PROMPT_FORMATS = ("prompt_only", "conversational_prompt_only", "messages")
# Formats whose prompt is a message list (`prompts.prompt_of` gives it as messages, not rendered text).
# Reference log-probs a row may carry (TRL's column names; `rayalign.judge` writes them, see the docstring).
PAIR_REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")
GROUP_REFERENCE_FIELD = "ref_logps"
CONVERSATIONAL_FORMATS = ("conversational", "implicit_conversational", "ultrafeedback", "conversational_prompt_only",
                          "messages")
ASSISTANT_TAG = "\n\nAssistant:"

_GDPO_FIELDS = ("target", "belief", "belief_text", "rejected_belief", "rejected_belief_text")
_K_SAMPLE_FIELDS = ("completions", "rewards")
_MAX_LEVELS = 10  # a GDPO level is one digit, 0..9


def detect_format(record: Any) -> str:
    """The name of the format `record` looks like (one of `FORMATS`); ValueError if it looks like none."""
    if not isinstance(record, dict):
        raise ValueError(f"a row must be an object, got {type_name(record)}")
    keys = {k for k, v in record.items() if v is not None}
    if keys & set(_GDPO_FIELDS):
        return "gdpo"
    if keys & set(_K_SAMPLE_FIELDS):
        return "k_sample"
    if keys & {"chosen", "rejected"}:
        has_messages = any(isinstance(record.get(k), list) for k in ("chosen", "rejected"))
        if "prompt" not in keys:
            return "implicit_conversational" if has_messages else "implicit"
        if isinstance(record["prompt"], list):
            return "conversational"
        return "ultrafeedback" if has_messages else "explicit"
    if "messages" in keys:  # before "prompt": UltraFeedback's *_gen rows hold both, the messages are the prompt
        return "messages"
    if "prompt" in keys:
        return "conversational_prompt_only" if isinstance(record["prompt"], list) else "prompt_only"
    raise ValueError(f"cannot detect the format: none of the known fields in {sorted(map(str, record))}")


def normalize_row(record: dict, fmt: str, tokenizer: Any = None) -> tuple[dict | None, Problems]:
    """Validate `record` as format `fmt`; return (normalized row, []) or (None, [(field, message), ...])."""
    problems: Problems = []
    row = _NORMALIZERS[fmt](record, problems, tokenizer)
    if "id" in record and record["id"] is not None:
        if isinstance(record["id"], (str, int)) and not isinstance(record["id"], bool):
            row["id"] = record["id"]
        else:
            problems.append(("id", f"must be a string or an integer, got {type_name(record['id'])}"))
    return (None if problems else row), problems


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen completion, rejected completion) from two full texts; ValueError if no prompt."""
    common = _common_prefix(chosen, rejected)
    cut = common.rfind(ASSISTANT_TAG)
    if cut >= 0:
        end = cut + len(ASSISTANT_TAG)
    else:
        last_space = re.search(r"\s+\S*\Z", common)
        end = last_space.start() if last_space else 0
    if not common[:end].strip():
        raise ValueError("chosen and rejected share no prompt (no common prefix up to '\\n\\nAssistant:' "
                         "or a whitespace boundary)")
    return common[:end], chosen[end:], rejected[end:]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


# --- field helpers: each returns the value (or None) and records what is wrong -----------------------

def _required(record: dict, name: str, problems: Problems) -> Any:
    if name not in record:
        problems.append((name, "missing field"))
        return None
    if record[name] is None:
        problems.append((name, "is null"))
    return record[name]


def _text(record: dict, name: str, problems: Problems) -> str | None:
    value = _required(record, name, problems)
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append((name, f"must be a string, got {type_name(value)}"))
        return None
    if not value.strip():
        problems.append((name, "is empty" if value == "" else "is whitespace-only"))
        return None
    return value


def _messages_field(record: dict, name: str, problems: Problems) -> list[dict[str, str]] | None:
    value = _required(record, name, problems)
    return None if value is None else check_messages(value, name, problems)


def _number(value: Any, name: str, problems: Problems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        problems.append((name, f"must be a number, got {type_name(value)}"))
        return None
    if not math.isfinite(value):
        problems.append((name, f"must be a finite number, got {value}"))
        return None
    return float(value)


def _distinct(chosen: Any, rejected: Any, problems: Problems) -> None:
    if chosen is not None and chosen == rejected:
        problems.append(("chosen", "is identical to rejected"))


def _pair(prompt: str | None, chosen: str | None, rejected: str | None, record: dict,
          problems: Problems) -> dict:
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for name in ("score_chosen", "score_rejected", *PAIR_REFERENCE_FIELDS):
        if record.get(name) is not None:
            row[name] = _number(record[name], name, problems)
    return row


# --- one normalizer per format ---------------------------------------------------------------------

def _explicit(record: dict, problems: Problems, tokenizer: Any) -> dict:
    prompt, chosen, rejected = (_text(record, k, problems) for k in ("prompt", "chosen", "rejected"))
    _distinct(chosen, rejected, problems)
    return _pair(prompt, chosen, rejected, record, problems)


def _implicit(record: dict, problems: Problems, tokenizer: Any) -> dict:
    chosen, rejected = _text(record, "chosen", problems), _text(record, "rejected", problems)
    _distinct(chosen, rejected, problems)
    prompt = None
    if chosen is not None and rejected is not None and chosen != rejected:
        try:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
        except ValueError as e:
            problems.append(("prompt", str(e)))
    return _pair(prompt, chosen, rejected, record, problems)


def _conversational(record: dict, problems: Problems, tokenizer: Any) -> dict:
    if "prompt" not in record or record["prompt"] is None:
        problems.append(("prompt", "missing field (conversational rows need the prompt messages in 'prompt'; "
                                   "rows without one are 'implicit_conversational')"))
        prompt_messages = None
    else:
        prompt_messages = check_messages(record["prompt"], "prompt", problems)
    chosen = check_messages(_required(record, "chosen", problems), "chosen", problems)
    rejected = check_messages(_required(record, "rejected", problems), "rejected", problems)
    return _render_pair(prompt_messages, chosen, rejected, record, problems, tokenizer)


def _implicit_conversational(record: dict, problems: Problems, tokenizer: Any) -> dict:
    chosen, rejected = (_messages_field(record, name, problems) for name in ("chosen", "rejected"))
    prompt_messages = None
    if chosen is not None and rejected is not None:
        try:
            prompt_messages, chosen, rejected = split_implicit_conversation(chosen, rejected)
        except ImplicitPromptError as e:
            problems.append((e.field, str(e)))
    return _render_pair(prompt_messages, chosen, rejected, record, problems, tokenizer)


def _ultrafeedback(record: dict, problems: Problems, tokenizer: Any) -> dict:
    _text(record, "prompt", problems)
    chosen = check_messages(_required(record, "chosen", problems), "chosen", problems)
    rejected = check_messages(_required(record, "rejected", problems), "rejected", problems)
    prompt_messages, shaped = None, True
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages is not None and (len(messages) < 2 or messages[-1]["role"] != "assistant"):
            problems.append((name, "must be user turn(s) followed by a final assistant turn"))
            shaped = False
    if shaped and chosen is not None and rejected is not None:
        if chosen[:-1] != rejected[:-1]:
            problems.append(("rejected", "the turns before the final assistant turn differ from chosen's"))
        else:
            prompt_messages = chosen[:-1]
            chosen, rejected = chosen[-1:], rejected[-1:]
    return _render_pair(prompt_messages, chosen, rejected, record, problems, tokenizer)


def _render_pair(prompt_messages: list | None, chosen: list | None, rejected: list | None, record: dict,
                 problems: Problems, tokenizer: Any) -> dict:
    if prompt_messages is None or chosen is None or rejected is None:
        return _pair(None, None, None, record, problems)
    try:
        prompt = render_prompt(prompt_messages, tokenizer)
    except ValueError as e:
        problems.append(("prompt", str(e)))
        return _pair(None, None, None, record, problems)
    texts: dict[str, str | None] = {"chosen": None, "rejected": None}
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in messages):
            problems.append((name, "is empty (its messages have no content)"))
        try:
            texts[name] = render_completion(prompt_messages, messages, prompt, tokenizer)
        except ValueError as e:
            problems.append((name, str(e)))
    _distinct(texts["chosen"], texts["rejected"], problems)
    return _pair(prompt, texts["chosen"], texts["rejected"], record, problems)


def _prompt_only(record: dict, problems: Problems, tokenizer: Any) -> dict:
    return {"prompt": _text(record, "prompt", problems)}


def _conversational_prompt_only(record: dict, problems: Problems, tokenizer: Any) -> dict:
    return {"prompt": _prompt_messages(_messages_field(record, "prompt", problems), "prompt", problems)}


def _messages(record: dict, problems: Problems, tokenizer: Any) -> dict:
    messages = _messages_field(record, "messages", problems)
    if messages is not None:
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a prompt is the conversation before the assistant's (last) reply
        if not messages:
            problems.append(("messages", "has only assistant turns: no prompt is left once they are dropped"))
            messages = None
    return {"prompt": _prompt_messages(messages, "messages", problems)}


def _prompt_messages(messages: list | None, name: str, problems: Problems) -> list | None:
    """Messages that can prompt a model: some content, and not ending with the assistant's turn."""
    if messages is None:
        return None
    if not any(m["content"].strip() for m in messages):
        problems.append((name, "is empty (its messages have no content)"))
        return None
    if messages[-1]["role"] == "assistant":
        problems.append((name, "ends with an assistant turn; a prompt ends with the turn the model answers"))
        return None
    return messages


def _k_sample(record: dict, problems: Problems, tokenizer: Any) -> dict:
    prompt = _text(record, "prompt", problems)
    completions = _required(record, "completions", problems)
    rewards = _required(record, "rewards", problems)
    if completions is not None:
        if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
            problems.append(("completions", f"must be a list of strings, got {_list_type(completions)}"))
        elif len(completions) < 2:
            problems.append(("completions", f"needs K >= 2 completions, got {len(completions)}"))
    if rewards is not None:
        rewards = _numbers(rewards, "rewards", completions, problems)
    row = {"prompt": prompt, "completions": completions, "rewards": rewards}
    if record.get(GROUP_REFERENCE_FIELD) is not None:
        row[GROUP_REFERENCE_FIELD] = _numbers(record[GROUP_REFERENCE_FIELD], GROUP_REFERENCE_FIELD, completions,
                                              problems)
    return row


def _numbers(values: Any, name: str, completions: Any, problems: Problems) -> list | None:
    """A list of finite numbers, one per completion (`name[i]` names a bad one)."""
    if not isinstance(values, list):
        problems.append((name, f"must be a list of numbers, got {type_name(values)}"))
        return None
    values = [_number(v, f"{name}[{i}]", problems) for i, v in enumerate(values)]
    if isinstance(completions, list) and len(values) != len(completions):
        problems.append((name, f"has {len(values)} values for {len(completions)} completions"))
    return values


def _list_type(value: Any) -> str:
    if not isinstance(value, list):
        return type_name(value)
    return "a list holding " + ", ".join(sorted({type_name(v) for v in value}))


def _gdpo(record: dict, problems: Problems, tokenizer: Any) -> dict:
    row: dict[str, Any] = {"prompt": _text(record, "prompt", problems), "target": _target(record, problems)}
    for name in ("belief", "rejected_belief"):
        row[name] = _level(record, name, row["target"], problems)
    for name in ("belief_text", "chosen", "rejected", "rejected_belief_text"):
        row[name] = _text(record, name, problems)
    for name in ("belief_text", "rejected_belief_text"):
        if row[name] is not None and ">" in row[name]:
            problems.append((name, "must not contain '>' (the first '>' closes the belief prefix)"))
    if row["belief"] is not None and row["belief"] == row["rejected_belief"]:
        problems.append(("rejected_belief", "equals belief; rejected must be an answer of another belief"))
    if row["belief"] is not None and row["target"] is not None and row["target"][row["belief"]] == 0:
        problems.append(("belief", f"level {row['belief']} has target probability 0 (beliefs are drawn "
                                   "from the target)"))
    _distinct(row["chosen"], row["rejected"], problems)
    if record.get("group") is not None:
        group = record["group"]
        if isinstance(group, bool) or not isinstance(group, (str, int)):
            problems.append(("group", f"must be a string or an integer, got {type_name(group)}"))
        row["group"] = group
    return row


def _target(record: dict, problems: Problems) -> list[float] | None:
    value = _required(record, "target", problems)
    if value is None:
        return None
    if not isinstance(value, list) or not 2 <= len(value) <= _MAX_LEVELS:
        problems.append(("target", f"must be a list of 2..{_MAX_LEVELS} probabilities, got "
                                   f"{_list_type(value) if not isinstance(value, list) else len(value)}"))
        return None
    probs = [_number(p, f"target[{i}]", problems) for i, p in enumerate(value)]
    if any(p is None for p in probs):
        return None
    if any(p < 0 for p in probs):
        problems.append(("target", f"has a negative probability: {value}"))
        return None
    if abs(sum(probs) - 1.0) > 1e-4:
        problems.append(("target", f"must sum to 1 (within 1e-4), sums to {sum(probs):.6g}"))
        return None
    return probs


def _level(record: dict, name: str, target: list[float] | None, problems: Problems) -> int | None:
    value = _required(record, name, problems)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append((name, f"must be an integer level, got {type_name(value)}"))
        return None
    if target is not None and not 0 <= value < len(target):
        problems.append((name, f"level {value} is out of range for a target of {len(target)} levels"))
        return None
    return value


_NORMALIZERS: dict[str, Callable[[dict, Problems, Any], dict]] = {
    "explicit": _explicit,
    "implicit": _implicit,
    "conversational": _conversational,
    "implicit_conversational": _implicit_conversational,
    "ultrafeedback": _ultrafeedback,
    "prompt_only": _prompt_only,
    "conversational_prompt_only": _conversational_prompt_only,
    "messages": _messages,
    "k_sample": _k_sample,
    "gdpo": _gdpo,
}
