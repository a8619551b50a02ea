"""A reward model: check it, load it, and score prompt + completion with it, as TRL's RewardTrainer feeds it.

A reward model is an `AutoModelForSequenceClassification` with one output (`num_labels=1`), a local
directory or a hub id, with its own tokenizer and chat template. `check_reward_model` refuses anything else
with one line naming the config key (a causal LM would otherwise load with a freshly initialised, random
score head and a warning). `RewardModel.score` returns r(x, y) for every sample of every prompt.

The input is built as TRL 1.x's `RewardTrainer` builds it, so a model trained there scores what it learnt:
- a string prompt: the text prompt + completion, EOS appended unless already there, tokenized with the
  tokenizer's special tokens;
- a conversational prompt (a list of {role, content} messages): the model's own chat template over the
  prompt's messages plus {"role": "assistant", "content": completion} (no generation prompt), whose
  rendering already holds the template's special tokens. A tokenizer without a chat template is an error.
A sequence longer than `max_length` tokens keeps its end (the completion, and the last token the score is
read at). Batches are right-padded with the model's pad id, so padding never shifts positions; the model
reads its score at the last non-pad token, as transformers' sequence classifiers do.

It does not fit reward models (`rayalign.tasks.reward_model`), run Ray, or choose pairs
(`rayalign.core.reward_model`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from rayalign.config_checks import ConfigError

SEQUENCE_CLASSIFIER = "ForSequenceClassification"


def _is_conversation(prompt: Any) -> bool:
    """A list of {role, content} messages (a numpy array of them after a Parquet round trip), not a string."""
    if isinstance(prompt, str):
        return False
    try:
        items = list(prompt)
    except TypeError:
        return False
    return bool(items) and all(isinstance(m, dict) for m in items)


def check_classifier(model_config: Any, name: str, key: str) -> None:
    """ConfigError naming `key` unless `model_config` describes a one-output sequence classifier."""
    architectures = list(getattr(model_config, "architectures", None) or [])
    if not any(a.endswith(SEQUENCE_CLASSIFIER) for a in architectures):
        what = "/".join(architectures) if architectures else "a model whose config.json names no architecture"
        raise ConfigError(f"{key}: {name} is {what}, not a sequence classifier; a reward model is an "
                          "AutoModelForSequenceClassification with num_labels=1")
    if model_config.num_labels != 1:
        raise ConfigError(f"{key}: {name} has {model_config.num_labels} labels; a reward model has one scalar "
                          "output (num_labels=1)")


def reward_load_options(model_config: Any):
    """How reward models load: the run's trust_remote_code and attention setting, not `model.revision`
    (a revision names a commit of the policy's repository, not of another one)."""
    from rayalign.models import LoadOptions

    return dataclasses.replace(LoadOptions.of(model_config), revision=None)


def check_reward_model(name: str, key: str, *, load=None) -> None:
    """Before anything loads: `name` exists (local path, or a cached hub id offline) and is a reward model."""
    from transformers import AutoConfig

    from rayalign.models import LoadOptions, ModelNotFoundError, check_model_name, resolve_name_or_path

    if "://" in name:  # a storage location, read by the stage itself (and checked there)
        return
    try:
        check_model_name(name, key)
        path = resolve_name_or_path(name)
        model_config = AutoConfig.from_pretrained(path, **(load or LoadOptions()).hub_kwargs(path))
    except ModelNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable config.json, an unknown model_type
        raise ConfigError(f"{key}: cannot read {name}'s config: {' '.join(str(exc).split())}") from None
    check_classifier(model_config, name, key)


def reward_text(tokenizer: Any, prompt: str | list[dict], completion: str, *, key: str) -> str:
    """The text a reward model scores for one sample (see the module docstring)."""
    if _is_conversation(prompt):
        if not tokenizer.chat_template:
            raise ConfigError(f"{key}: its tokenizer has no chat template, and the prompts are conversations "
                              "(lists of messages); give a reward model whose tokenizer has one")
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        return tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": completion}],
                                             tokenize=False)
    text = prompt + completion
    eos = tokenizer.eos_token
    return text if eos is None or text.endswith(eos) else text + eos


def encode_reward_inputs(tokenizer: Any, prompts: list, completions: list[str], *, max_length: int,
                         key: str = "reward model") -> list[list[int]]:
    """Token ids of each (prompt, completion), its end kept when longer than `max_length`."""
    ids = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = reward_text(tokenizer, prompt, completion, key=key)
        # the chat template writes its own special tokens; a plain text gets the tokenizer's (as TRL does)
        tokens = tokenizer(text, add_special_tokens=not _is_conversation(prompt))["input_ids"]
        ids.append(tokens[-max_length:])
    return ids


def score_ids(model, ids: list[list[int]], *, pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """The model's scalar output for each token-id row, (N,) float32; right-padded batches of `batch_size`."""
    scores = []
    for start in range(0, len(ids), batch_size):
        rows = ids[start:start + batch_size]
        length = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [pad_token_id] * (length - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], dtype=torch.long)
        device = next(model.parameters()).device
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


class RewardModel:
    """A loaded reward model and its tokenizer; `score(prompts, texts)` -> (P, K) rewards."""

    def __init__(self, name: str, *, key: str, dtype: str = "float32", load=None,
                 max_length: int = 512, batch_size: int = 16, device: str | None = None):
        from transformers import AutoModelForSequenceClassification

        from rayalign.models import LoadOptions, _from_pretrained, load_tokenizer, resolve_name_or_path

        path, load = resolve_name_or_path(name), load or LoadOptions()
        self.key, self.max_length, self.batch_size = key, max_length, batch_size
        self.tokenizer = load_tokenizer(path, load, padding_side="right")
        self.model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, path,
                                      **load.model_kwargs(path), dtype=getattr(torch, dtype))
        check_classifier(self.model.config, name, key)
        text_config = self.model.config.get_text_config()
        if text_config.pad_token_id is None:  # the model reads its score before the first pad: it needs one
            text_config.pad_token_id = self.tokenizer.pad_token_id
        self.pad_token_id = text_config.pad_token_id
        if len(self.tokenizer) > self.model.get_input_embeddings().weight.shape[0]:  # load_tokenizer added a pad
            self.model.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        if device is not None:
            self.model.to(device)
        self.model.eval()

    @torch.no_grad()
    def score(self, prompts: list, texts: list[list[str]]) -> torch.Tensor:
        """r(x_p, y_pk) for each prompt p and each of its K samples: (P, K) float32."""
        flat_prompts = [p for p, samples in zip(prompts, texts, strict=True) for _ in samples]
        flat_texts = [t for samples in texts for t in samples]
        ids = encode_reward_inputs(self.tokenizer, flat_prompts, flat_texts, max_length=self.max_length, key=self.key)
        scores = score_ids(self.model, ids, pad_token_id=self.pad_token_id, batch_size=self.batch_size)
        return scores.view(len(texts), -1) if texts else scores.view(0, 0)
