"""Configuration errors, the small validators every config section uses, and the placement checks they share.

Kept apart from the schema so that the section modules (`rayalign.config`, `rayalign.config_loop`)
share one error type and one wording for invalid values.
"""

from __future__ import annotations

import difflib
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, choices: tuple) -> None:
    if value in choices:
        return
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}; got {value!r}{hint}")


def _positive(value: float, key: str) -> None:
    _require(value > 0, key, f"must be > 0; got {value!r}")


def _check_resources(resources: dict, key: str) -> None:
    for name, amount in resources.items():
        _require(name not in ("CPU", "GPU"), key, f"{name} has its own field (cpus_per_*/gpus_per_*, use_gpu)")
        _require(isinstance(amount, (int, float)) and amount > 0, key, f"{name}: must be a number > 0; got {amount!r}")


def _gpu_amount(gpus: float, key: str) -> None:
    """Ray's rule for a GPU request: a fraction of one GPU, or whole GPUs."""
    _require(gpus <= 1 or float(gpus).is_integer(), key, f"must be a fraction of one GPU or a whole number; got {gpus}")


def _stage_placement(section, name: str) -> None:
    """gpus_per_actor, dtype and (generate, judge) offload_between_passes of a model-holding inference stage."""
    from rayalign.devices import INFERENCE_DTYPES

    _require(section.gpus_per_actor >= 0, f"{name}.gpus_per_actor", f"must be >= 0; got {section.gpus_per_actor}")
    _gpu_amount(section.gpus_per_actor, f"{name}.gpus_per_actor")
    _one_of(section.dtype, f"{name}.dtype", INFERENCE_DTYPES)
    _require(not getattr(section, "offload_between_passes", False) or section.persistent,
             f"{name}.offload_between_passes", f"needs {name}.persistent=true (a per-pass actor's memory is freed "
             "when its pass ends)")


def _vllm_engine(generate) -> None:
    """generate.*'s vLLM engine settings: tensor parallel over whole GPUs of the actor, context, memory share."""
    _positive(generate.tensor_parallel_size, "generate.tensor_parallel_size")
    if generate.tensor_parallel_size > 1:
        _require(generate.backend == "vllm", "generate.tensor_parallel_size", "> 1 needs generate.backend=vllm")
        _require(generate.gpus_per_actor >= generate.tensor_parallel_size, "generate.gpus_per_actor",
                 f"must be >= generate.tensor_parallel_size={generate.tensor_parallel_size} (one GPU per shard); "
                 f"got {generate.gpus_per_actor}")
    _require(generate.max_model_len is None or generate.max_model_len > 0, "generate.max_model_len",
             "must be > 0 or null (the model's own)")
    _require(0.0 < generate.gpu_memory_utilization <= 1.0, "generate.gpu_memory_utilization",
             f"must be in (0, 1]; got {generate.gpu_memory_utilization}")


def _train_placement(train) -> None:
    """Where train.* runs: its engine and ZeRO stage, DeepSpeed's offloads, and gpus_per_worker (read with use_gpu;
    a fraction, sharing a GPU, only for a single worker)."""
    _one_of(train.engine, "train.engine", ("ddp", "deepspeed"))
    _one_of(train.zero_stage, "train.zero_stage", (1, 2, 3))
    for key in ("offload_optimizer", "offload_params"):
        _require(not getattr(train, key) or train.engine == "deepspeed", f"train.{key}",
                 f"needs train.engine=deepspeed (got {train.engine})")
    _require(not train.offload_params or train.zero_stage == 3, "train.offload_params",
             f"needs train.zero_stage=3, where parameters are partitioned (got {train.zero_stage})")
    _positive(train.gpus_per_worker, "train.gpus_per_worker")
    _gpu_amount(train.gpus_per_worker, "train.gpus_per_worker")
    _require(train.use_gpu or train.gpus_per_worker == 1.0, "train.gpus_per_worker",
             "is read only with train.use_gpu=true")
    _require(train.gpus_per_worker >= 1 or train.num_workers == 1, "train.gpus_per_worker",
             f"a fraction ({train.gpus_per_worker}) needs train.num_workers=1: Ray may place two ranks on one GPU, "
             "which NCCL refuses")
