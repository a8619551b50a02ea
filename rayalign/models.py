"""Load the policy, the reference model and the tokenizer from a Hugging Face id or a local directory.

- `load_tokenizer` gives every tokenizer a pad token: eos when there is one (safe, because padding is
  always masked by the attention mask and the loss masks, never by comparing ids to pad), otherwise a new
  "<|pad|>" token, which grows the vocabulary; `load_model(..., tokenizer=tok)` then resizes the model's
  embeddings to match (see `resize_for_tokenizer`). Right padding is for training, left for generation.
- `load_model` returns an eval-mode `AutoModelForCausalLM`; the training stage switches the policy to
  train mode itself.
- `load_policy_and_reference` loads both (the reference defaults to the policy's weights) and freezes the
  reference.
- A name that looks like a local path but does not exist fails with a `ModelNotFoundError` (a ValueError)
  naming it, instead of a confusing hub lookup; so does a hub id that cannot be found (offline: not in the
  local cache). `check_model_name` runs those checks before anything loads, naming the config key.
- `LoadOptions` (revision, trust_remote_code, attn_implementation; from `model.*`) is the one bundle of
  loading settings every stage passes here, so a training worker, the judge, the generator, the reference
  scorer and SFT load a model the same way. `trust_remote_code` is off unless asked for; a revision
  applies to hub ids only (a local directory has no revisions).

The tiny offline test model lives in `rayalign.tiny` and is re-exported here. This module does not
download on its own (set HF_HUB_OFFLINE=1 to forbid it), train, or import ray/vllm/deepspeed;
transformers and torch are imported inside the functions so `import rayalign.models` stays cheap.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from rayalign.tiny import (  # noqa: F401  (re-exported: the CLI and tests import them from here)
    add_make_tiny_model_arguments,
    build_tiny_model,
    count_parameters,
    make_tiny_model,
    run_make_tiny_model,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PAD_TOKEN_IF_NO_EOS = "<|pad|>"
DTYPES = ("float32", "bfloat16")
PADDING_SIDES = ("left", "right")


@dataclass(frozen=True)
class LoadOptions:
    """How to load every model and tokenizer of a run (`model.revision`, `model.trust_remote_code`,
    `model.attn_implementation`). Plain and picklable: it travels to Ray actors and workers as is."""

    revision: str | None = None  # a hub branch, tag or commit; ignored for local directories
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # None: transformers' choice; HF models only (vLLM picks its own)

    @classmethod
    def of(cls, model_config) -> LoadOptions:
        """The options of a `rayalign.config.ModelConfig` (any object with these three attributes)."""
        return cls(model_config.revision, model_config.trust_remote_code, model_config.attn_implementation)

    def hub_kwargs(self, path: str) -> dict:
        """`from_pretrained` keyword arguments shared by models and tokenizers of `path` (a resolved name)."""
        kwargs = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None and not Path(path).exists():  # a local directory has no revisions
            kwargs["revision"] = self.revision
        return kwargs

    def model_kwargs(self, path: str) -> dict:
        """`hub_kwargs` plus the attention implementation: for any `AutoModel*.from_pretrained` of `path`."""
        attention = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        return {**self.hub_kwargs(path), **attention}


# huggingface_hub's errors for "no such repo here" (by name: importing the hub just to compare is not worth it)
_HUB_NOT_FOUND = ("LocalEntryNotFoundError", "RepositoryNotFoundError", "HFValidationError", "GatedRepoError",
                  "RevisionNotFoundError")


class ModelNotFoundError(ValueError):
    """A model name that is neither an existing local path nor a hub id that can be loaded: a user mistake."""


class PolicyAndReference(NamedTuple):
    """What `load_policy_and_reference` returns; unpacks as `policy, reference, tokenizer = ...`."""

    policy: PreTrainedModel
    reference: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase


def looks_local(name_or_path: str | os.PathLike) -> bool:
    """True when `name_or_path` can only mean a local path, never a hub id.

    Hub ids are "name" or "org/name" (at most one "/", never a backslash or a leading "." or "~"), so a
    single "/" is not evidence of a path; a leading ".", "/" or "~", a second "/", a backslash, or a
    Path object is.
    """
    s = os.fspath(name_or_path)
    return (isinstance(name_or_path, Path) or s.startswith((".", "/", "~", os.sep)) or "\\" in s
            or s.count("/") > 1)


def resolve_name_or_path(name_or_path: str | os.PathLike) -> str:
    """Return an existing local directory as a string, or a hub id unchanged.

    Raises ValueError naming the path when it looks local (see `looks_local`) and does not exist.
    """
    expanded = Path(os.fspath(name_or_path)).expanduser()
    if expanded.exists():
        return str(expanded)
    if looks_local(name_or_path):
        raise ModelNotFoundError(f"model path {os.fspath(name_or_path)!r} does not exist (resolved to "
                                 f"{str(expanded)!r}); give an existing local directory or a Hugging Face hub id")
    return os.fspath(name_or_path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _not_found(name: str, revision: str | None = None) -> ModelNotFoundError:
    where = "a hub id in the local cache (HF_HUB_OFFLINE=1)" if _offline() else "a hub id that can be found"
    at = f" at model.revision={revision!r}" if revision is not None else ""
    return ModelNotFoundError(f"{name!r} is neither an existing local path nor {where}{at}; check the spelling")


def check_model_name(name: str, key: str, *, model: bool = True, revision: str | None = None) -> None:
    """Raise ModelNotFoundError naming `key` when `name` cannot be a model: a missing local path, a local
    directory without config.json (`model`: a model, not only a tokenizer), or offline an uncached hub id
    (at `revision`, when given). Online, a hub id is not looked up here (that needs the network); loading
    reports it."""
    if "://" in name:  # a storage location, read by the stages themselves
        return
    try:
        path = Path(resolve_name_or_path(name))
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{key}: {exc}") from None
    if path.exists():
        if model and path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{key}: {name} holds no Hugging Face model (no config.json)")
        return
    if _offline():
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(name, revision=revision, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  (not cached, or not even a valid id: the same advice)
            if type(exc).__name__ not in (*_HUB_NOT_FOUND, "ValueError"):
                raise
            raise ModelNotFoundError(f"{key}: {_not_found(name, revision)}") from None


def _from_pretrained(load, path: str, **kwargs):
    """`load(path, ...)`, turning transformers' "no such repo" OSError into a one-line ModelNotFoundError."""
    try:
        return load(path, **kwargs)
    except OSError as exc:
        cause, names = exc, set()
        while cause is not None:
            names.add(type(cause).__name__)
            cause = cause.__cause__ or cause.__context__
        if names & set(_HUB_NOT_FOUND):
            raise _not_found(path, kwargs.get("revision")) from exc
        raise
    except ImportError as exc:  # e.g. attn_implementation=flash_attention_2 without the flash_attn package
        if kwargs.get("attn_implementation"):
            from rayalign.config_checks import ConfigError

            raise ConfigError(f"model.attn_implementation: {kwargs['attn_implementation']} cannot load {path}: "
                              f"{str(exc).splitlines()[0]}") from exc
        raise


def load_tokenizer(
    name_or_path: str | os.PathLike, options: LoadOptions | None = None, *, padding_side: str = "right"
) -> PreTrainedTokenizerBase:
    """Load a tokenizer, guarantee a pad token, and set the padding side ("right": train, "left": generate).

    options: revision and trust_remote_code (`LoadOptions.of(config.model)`); None: the defaults.

    If the tokenizer has no pad token, eos becomes pad; if it has no eos either, "<|pad|>" is added and
    len(tokenizer) grows by one, so pass the tokenizer to `load_model` to resize the embeddings.
    """
    from transformers import AutoTokenizer

    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    path = resolve_name_or_path(name_or_path)
    # padding_side as a from_pretrained kwarg, so it is also what save_pretrained writes back.
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, path, **(options or LoadOptions()).hub_kwargs(path),
                                 padding_side=padding_side)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN_IF_NO_EOS})
    return tokenizer


def resize_for_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the model's embeddings to len(tokenizer) if the tokenizer gained tokens; set pad_token_id.

    New rows (input embeddings and lm_head) are set to the mean of the existing rows, deterministically:
    Hugging Face's default samples them randomly, which would make a policy and a reference loaded from the
    same weights disagree on every token's log-prob (the lm_head row enters the softmax normaliser). Never
    shrinks: many checkpoints pad their vocab beyond len(tokenizer) on purpose.
    """
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new > old:
        model.resize_token_embeddings(new, mean_resizing=False)
        with torch.no_grad():
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None and emb.weight.shape[0] == new:
                    emb.weight[old:] = emb.weight[:old].mean(dim=0, keepdim=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def load_model(
    name_or_path: str | os.PathLike, options: LoadOptions | None = None, *, dtype: str = "float32",
    device: str | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Load an `AutoModelForCausalLM` in eval mode with dtype "float32" or "bfloat16".

    options: revision, trust_remote_code and attn_implementation (`LoadOptions.of(config.model)`); None:
    the defaults. device: None leaves the model on the CPU. tokenizer: when given, the embeddings are
    resized to it and its pad id is written into the config (see `resize_for_tokenizer`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = resolve_name_or_path(name_or_path)
    kwargs = (options or LoadOptions()).model_kwargs(path)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, **kwargs, dtype=getattr(torch, dtype))
    if tokenizer is not None:
        resize_for_tokenizer(model, tokenizer)
    if device is not None:
        model.to(device)
    return model.eval()


def load_policy_and_reference(
    policy: str | os.PathLike, reference: str | os.PathLike | None = None, options: LoadOptions | None = None, *,
    dtype: str = "float32", device: str | None = None, padding_side: str = "right",
) -> PolicyAndReference:
    """Load the policy, a frozen reference (default: the policy's weights) and the policy's tokenizer.

    Both models come back in eval mode; the reference has requires_grad False on every parameter.
    """
    tokenizer = load_tokenizer(policy, options, padding_side=padding_side)
    kwargs = dict(dtype=dtype, device=device, tokenizer=tokenizer)
    policy_model = load_model(policy, options, **kwargs)
    reference_model = load_model(policy if reference is None else reference, options, **kwargs)
    reference_model.requires_grad_(False)
    return PolicyAndReference(policy_model, reference_model, tokenizer)


@contextlib.contextmanager
def _no_deepspeed_probe():
    """`save_pretrained` unwraps the model with accelerate, which imports deepspeed (~1 s, once per process)
    only to test `isinstance(model, DeepSpeedEngine)`. While deepspeed has not been imported, nothing can be
    such an engine, so accelerate is told it is absent for the call; with deepspeed loaded nothing changes."""
    import sys

    try:
        import accelerate.utils.other as unwrap_module
    except ImportError:  # transformers then unwraps without accelerate
        unwrap_module = None
    if unwrap_module is None or "deepspeed" in sys.modules:
        yield
        return
    probe = unwrap_module.is_deepspeed_available
    unwrap_module.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        unwrap_module.is_deepspeed_available = probe


def save_weights(model: PreTrainedModel, directory: Path, state_dict: dict | None = None, *,
                 dtype=None) -> dict:
    """`model.save_pretrained(directory)` with `state_dict` (default: the model's own) cast to `dtype` (None: as
    is; floating tensors only), and config.json saying that dtype, so a plain `from_pretrained` loads it as
    saved (transformers writes the live model's dtype there, float32 master weights in training). Returns the
    state dict it saved (cast)."""
    import json

    import torch

    state_dict = state_dict if state_dict is not None else model.state_dict()
    if dtype is not None:
        state_dict = {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state_dict.items()}
    with _no_deepspeed_probe():
        model.save_pretrained(directory, state_dict=state_dict)
    if dtype is not None:
        path = Path(directory) / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return state_dict
