"""Where a model-holding stage runs and in which dtype: the one place that decides it.

Every actor that holds a model (reference scorer, judge, HF generator, reward model) calls `stage_device`
with the GPUs its stage was given (`ref.gpus_per_actor`, `judge.gpus_per_actor`, `generate.gpus_per_actor`;
fractions let stages share one device) and `inference_dtype` with its stage's dtype setting. Ray sets
CUDA_VISIBLE_DEVICES for an actor that reserved GPUs, so "cuda" is the device Ray gave it. The training
workers take theirs from Ray Train (`train.use_gpu`) and keep float32 weights: `train.precision=bf16` is
autocast (DDP) or DeepSpeed's bf16 mode, both with float32 master weights (`rayalign.train_loop`).

Also here: moving a host's models off its GPU between passes and back (`move_models`). Not here: loading models
(`rayalign.models`), vLLM's own placement (it reads the dtype).
"""

from __future__ import annotations

INFERENCE_DTYPES = ("auto", "float32", "bfloat16")


def inference_dtype(name: str, gpus: float) -> str:
    """The dtype an inference stage loads its model in: "auto" is bfloat16 on a GPU, float32 on the CPU
    (bf16 matmuls on a CPU are slow and its log-probs lose the judge's small margins)."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {INFERENCE_DTYPES}, got {name!r}")
    if name != "auto":
        return name
    return "bfloat16" if gpus > 0 else "float32"


def stage_device(gpus: float, stage: str = "this stage"):
    """torch.device("cuda") when the stage was given GPUs, else the CPU; a stage given GPUs in a process
    that sees none is a placement mistake, reported rather than silently run on the CPU."""
    import torch

    if gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"{stage} was given {gpus} GPU(s) but this process sees no CUDA device "
                           "(CUDA_VISIBLE_DEVICES empty, or a CPU build of torch); set its gpus_per_actor to 0")
    return torch.device("cuda", torch.cuda.current_device())


def model_device(model):
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    import torch

    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def move_models(models, device) -> None:
    """Each model (once; None skipped) to `device`. Leaving a GPU, its freed blocks go back to CUDA (`empty_cache`):
    torch's caching allocator would otherwise keep them reserved, out of reach of the next stage's process."""
    import torch

    moved: set[int] = set()
    for model in models:
        if model is not None and id(model) not in moved:
            moved.add(id(model))
            model.to(device)
    if torch.device(device).type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def actor_resources(gpus: float, resources: dict[str, float]) -> dict:
    """`map_batches` keyword arguments that reserve a stage's GPUs and extra Ray resources per actor."""
    out: dict = {"num_gpus": gpus} if gpus else {}
    if resources:
        out["resources"] = dict(resources)
    return out


def training_autocast(train, device_type: str):
    """The context a training forward runs in: bf16 autocast over float32 weights for `train.precision=bf16`
    with DDP (and the in-process oracle); off for fp32 and for DeepSpeed, whose bf16 mode keeps its own bf16
    copy of the weights beside the float32 master copy. `train` is a `TrainConfig`."""
    import torch

    if train.precision == "bf16" and train.engine == "ddp":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return torch.autocast(device_type, enabled=False)


_LIBC: list = []  # the C library handle, looked up once (empty list: not yet; [None]: not glibc)


def release_freed_host_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`); a no-op without glibc.

    Why: under glibc's dynamic mmap threshold, the many tensors a CPU backward frees stay in the process's
    resident memory, and the optimizer's first allocation of its state then comes on top of them: one
    0.5B-model step measured 11.1 GB peak RSS instead of 8.8 GB (benchmarks/bench_memory.py). Called
    before each optimizer step, where the backward's activations are all free; it takes milliseconds.
    """
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") else None)
        except OSError:
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0].malloc_trim(0)
