"""LoRA through PEFT for the training stage (`model.lora=true`): adapters on the policy, its base as reference.

- `add_adapters` wraps a loaded policy in a PEFT LoRA model built from the `model.lora_*` keys; only the
  adapters train. Their initial values come from `train.seed` whatever the RNG state (so a hand-built
  PEFT model with the same seed starts from the same adapters); given a checkpoint, its adapters replace
  them (resume).
- `BaseReference` is the reference when it is the policy's own base: the same model called with its
  adapters disabled, in eval mode (no dropout, like a separately loaded reference) and without gradient.
  No second copy of the weights is held.
- `save_adapters` writes a checkpoint's adapters (`adapter_model.safetensors` + `adapter_config.json`);
  `save_merged` writes `final/` as a plain HF model (the adapters merged into the base weights), so the
  next loop iteration, the generators (HF and vLLM), the judge and the scorer load it like any model.
- `check_target_modules` finds target modules that match nothing before anything runs, on a meta-device
  skeleton of the architecture (no weights are read): a `ConfigError` naming the key.

It uses PEFT's documented API only (`LoraConfig`, `get_peft_model`, `disable_adapter`, `merge_and_unload`,
`set_peft_model_state_dict`) and imports peft inside the functions (`import rayalign` stays light). It does
not decide when to save or whether the base is the reference (the worker does), and knows nothing of Ray
or DeepSpeed.
"""

from __future__ import annotations

from pathlib import Path

from rayalign.config import ConfigError, ModelConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json")
ALL_LINEAR = "all-linear"


def lora_config(model: ModelConfig):
    """PEFT's `LoraConfig` for the `model.lora_*` keys (a causal LM; no bias trained)."""
    from peft import LoraConfig

    targets = model.lora_target_modules
    return LoraConfig(r=model.lora_rank, lora_alpha=model.lora_alpha, lora_dropout=model.lora_dropout,
                      target_modules=ALL_LINEAR if targets == (ALL_LINEAR,) else list(targets),
                      bias="none", task_type="CAUSAL_LM")


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's dotted path is the name or ends with ".name"."""
    return name == target or name.endswith(f".{target}")


def check_target_modules(name_or_path: str, model: ModelConfig) -> None:
    """ConfigError naming `model.lora_target_modules` when one of them matches no module of the policy
    `name_or_path` (or PEFT refuses them), listing the model's linear layers to choose from."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayalign.models import LoadOptions, resolve_name_or_path

    path = resolve_name_or_path(name_or_path)
    architecture = AutoConfig.from_pretrained(path, **LoadOptions.of(model).hub_kwargs(path))
    with torch.device("meta"):  # the module tree only: no memory, no weights read
        skeleton = AutoModelForCausalLM.from_config(architecture, trust_remote_code=model.trust_remote_code)
    names = [name for name, _ in skeleton.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    choices = f"its linear layers are {', '.join(linear)} (or give all-linear)"
    targets = model.lora_target_modules
    if targets != (ALL_LINEAR,):
        missing = [t for t in targets if not any(_matches(name, t) for name in names)]
        if missing:
            raise ConfigError(f"model.lora_target_modules: no module of {name_or_path} matches "
                              f"{', '.join(missing)}; {choices}")
    try:
        with torch.device("meta"):
            get_peft_model(skeleton, lora_config(model))
    except ValueError as exc:  # e.g. a module type LoRA cannot wrap
        reason = " ".join(str(exc).split())
        raise ConfigError(f"model.lora_target_modules: PEFT refuses them on {name_or_path}: {reason}; "
                          f"{choices}") from None


def add_adapters(model, config: ModelConfig, *, seed: int, checkpoint: Path | None = None):
    """The policy `model` wrapped in fresh LoRA adapters (a PEFT model; only the adapters require grad),
    initialised from `seed`; with `checkpoint`, that checkpoint's adapters are loaded into them."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    with torch.random.fork_rng():  # the adapters' init, independent of what ran before (and leaving no trace)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config(config))
    if checkpoint is not None:
        from safetensors.torch import load_file

        device = next(peft_model.parameters()).device
        state = load_file(str(Path(checkpoint) / ADAPTER_WEIGHTS), device=str(device))
        result = set_peft_model_state_dict(peft_model, state)
        missing = [key for key in result.missing_keys if "lora_" in key]
        wrong = missing or result.unexpected_keys
        if wrong:
            raise ValueError(f"{checkpoint}: its adapters do not fit model.lora_* ({len(missing)} missing, "
                             f"{len(result.unexpected_keys)} unexpected, e.g. {wrong[0]})")
    return peft_model


class BaseReference:
    """The reference model of a LoRA policy whose reference is its own base: calling it runs the policy
    with the adapters disabled, in eval mode and without gradient, then restores the training mode."""

    def __init__(self, peft_model):
        self.model = peft_model

    def __call__(self, *args, **kwargs):
        import torch

        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.model.disable_adapter():
                return self.model(*args, **kwargs)
        finally:
            self.model.train(training)


def save_adapters(peft_model, directory: Path, state_dict: dict | None = None) -> None:
    """The adapters only (PEFT's `save_pretrained` keeps the `lora_` entries of `state_dict`)."""
    # The embeddings are never resized in training, so the base model's own stay valid: never copy them.
    peft_model.save_pretrained(directory, state_dict=state_dict, save_embedding_layers=False)


def save_merged(peft_model, directory: Path, *, dtype=None) -> dict:
    """A plain HF model: the adapters merged into the base weights, cast to `dtype` if given; returns the state
    dict saved. Merges in place (the PEFT wrapper is gone afterwards): call it last, when training is over."""
    from rayalign.models import save_weights

    return save_weights(peft_model.merge_and_unload(), directory, dtype=dtype)
