"""One training-engine interface over DDP and DeepSpeed: forward module, backward, step, save, load.

This is the only module that imports DeepSpeed (lazily, inside `DeepSpeedEngine`). The trainer calls
`backward(loss)` once per micro-batch with a loss already scaled so that the gradients averaged over
workers are the gradient of the global-batch mean, then `step()` once per optimizer step.

Both engines own the optimizer and the schedule built by `rayalign.optim`. `step()` returns the global
gradient norm; a non-finite one means the update was NOT applied (the trainer then stops the run). They
do not know about data, losses or checkpoint layout (see `rayalign.checkpoint`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
import torch.distributed as dist

from rayalign.checkpoint import load_tensors
from rayalign.config import Config
from rayalign.devices import release_freed_host_memory
from rayalign.optim import build_optimizer, build_scheduler


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DDPEngine:
    """Plain PyTorch: DistributedDataParallel when there is more than one worker, no wrapper otherwise."""

    def __init__(self, model: torch.nn.Module, config: Config, total_steps: int):
        self.model = model
        self.module = torch.nn.parallel.DistributedDataParallel(model) if world_size() > 1 else model
        self.optimizer = build_optimizer(model.parameters(), config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, total_steps)
        self.max_grad_norm = config.optim.max_grad_norm or math.inf
        self._pending = 0
        self.accumulation = config.train.gradient_accumulation_steps

    def backward(self, loss: torch.Tensor) -> None:
        self._pending += 1
        # All-reduce only on the last micro-batch of the step; earlier ones accumulate locally.
        last = self._pending == self.accumulation
        sync = contextlib.nullcontext() if last or self.module is self.model else self.module.no_sync()
        with sync:
            loss.backward()

    def step(self) -> float:
        self._pending = 0
        release_freed_host_memory()  # the backward's freed activations, before the optimizer allocates
        # The gradients are already all-reduced, so every rank sees the same norm and makes the same choice.
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm))
        if math.isfinite(grad_norm):  # an inf/nan gradient would poison the weights and Adam's moments
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_state_dict(self, scratch: Path) -> dict[str, torch.Tensor] | None:
        """The full model weights (on every rank; the caller writes them from rank 0)."""
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def save(self, directory: Path, *, rank: int) -> None:
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        """Restore optimizer and schedule; the weights were loaded into the model before it was built."""
        state = load_tensors(directory / "optimizer.pt")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(config: Config) -> dict:
    """DeepSpeed's JSON config for our settings (the optimizer and schedule are passed as objects)."""
    train = config.train
    zero = {"stage": train.zero_stage}
    cpu = {"device": "cpu", "pin_memory": train.use_gpu}  # pinned host memory: faster copies to and from a GPU
    if train.offload_optimizer:
        zero["offload_optimizer"] = cpu
    if train.offload_params:
        zero["offload_param"] = cpu
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "gradient_clipping": config.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # a torch optimizer on CPU: DeepSpeed's fused ones need a JIT build
        # Offload steps our torch AdamW on the CPU copies (DeepSpeedCPUAdam is faster but JIT-builds a C++ op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def start_deepspeed_comm():
    """Import DeepSpeed and start its communication backend (gloo unless a process group exists); returns the
    module. On a CPU accelerator DeepSpeed would first JIT-compile its shared-memory all-reduce kernel (~30 s on
    each fresh node), which only its *inference* all-reduce calls: ZeRO training reduces through the process
    group, so the build is skipped (`build_shm_op` returning None is DeepSpeed's own "not available" path)."""
    import importlib

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # by module path: the attribute `deepspeed.comm.torch` is the torch package, not this module
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not (dist.is_available() and dist.is_initialized()):
        deepspeed.init_distributed(dist_backend="gloo")
    return deepspeed


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3 with a torch optimizer (gloo on CPU, NCCL on GPU)."""

    def __init__(self, model: torch.nn.Module, config: Config, total_steps: int):
        deepspeed = start_deepspeed_comm()
        optimizer = build_optimizer(model.parameters(), config.optim)
        scheduler = build_scheduler(optimizer, config.optim, total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config))
        self.model, self.module = model, self.engine
        self.zero_stage = config.train.zero_stage
        # LoRA: the frozen base is the stage's input model, reloaded on resume; checkpoint the adapters only
        self.adapters_only = config.model.lora

    def backward(self, loss: torch.Tensor) -> None:
        # The trainer already divided by the global batch: do not let DeepSpeed divide by accumulation again.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # a no-op except on the accumulation boundary, where it clips, steps and schedules

    def step(self) -> float:
        """The norm of the step `backward` took at the accumulation boundary. DeepSpeed's overflow check
        skips a step whose gradient norm is inf/nan (ZeRO 1-3 in fp32; in bf16 with its default
        bf16.check_grad_overflow), which `was_step_applied` reports."""
        grad_norm = float(self.engine.get_global_grad_norm())  # not None: zero's compute_grad_norm stays on
        if not self.engine.was_step_applied():
            return grad_norm if not math.isfinite(grad_norm) else math.inf
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path, *, rank: int) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state",  # collective
                                    exclude_frozen_parameters=self.adapters_only)

    def load(self, directory: Path) -> None:
        # DeepSpeed's own reader unpickles arbitrary objects (full pickle): read its files through ours instead.
        self.engine.checkpoint_engine.load = _deepspeed_safe_load
        # adapters only: the frozen base weights are absent from the saved module state, not missing
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state",
                                    load_module_strict=not self.adapters_only)

    def full_state_dict(self, scratch: Path) -> dict[str, torch.Tensor] | None:
        """The full weights in the module's dtype (float32, or bf16 in a bf16 run): the replicated module, or
        with ZeRO-3 gathered layer by layer into rank 0's memory (a collective; None on the other ranks)
        instead of a second DeepSpeed checkpoint on disk."""
        if self.zero_stage < 3:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        return self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=self.adapters_only)


def _deepspeed_safe_load(path: str, map_location=None):
    """DeepSpeed's checkpoint files with weights_only=True; its optimizer files also hold these plain records."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return load_tensors(path, map_location=map_location,
                        allowed=(LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address))


@contextlib.contextmanager
def partitioned_loading(config: Config):
    """Within: a Hugging Face `from_pretrained` under ZeRO-3 creates each parameter already partitioned
    across the ranks (`deepspeed.zero.Init`) and loads only its shard, so no rank ever holds the whole
    float32 model (transformers does this while an `HfDeepSpeedConfig` object is alive). Other engines
    and stages: nothing changes."""
    if config.train.engine != "deepspeed" or config.train.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    start_deepspeed_comm()
    settings = HfDeepSpeedConfig(deepspeed_config(config))  # transformers keeps only a weak reference
    try:
        yield
    finally:
        del settings


def build_engine(model: torch.nn.Module, config: Config, total_steps: int) -> DDPEngine | DeepSpeedEngine:
    if config.train.engine == "deepspeed":
        return DeepSpeedEngine(model, config, total_steps)
    return DDPEngine(model, config, total_steps)
