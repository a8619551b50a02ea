"""The generate.* vLLM engine settings: what reaches `LLM(...)` on a GPU and on the CPU build, and the checks
made before anything starts. Pure: no vLLM needed (tests/test_vllm_backend.py runs the engine itself)."""

from __future__ import annotations

import pytest

from rayalign.config import ConfigError
from rayalign.config_loader import load_config
from rayalign.samplers import vllm_engine_kwargs


def _generate(*overrides: str):
    return load_config(None, ["generate.backend=vllm", *overrides]).generate


def test_defaults_reach_the_engine_on_a_gpu():
    kwargs = vllm_engine_kwargs(_generate("generate.gpus_per_actor=1"), on_cpu=False)
    assert kwargs == {"logprobs_mode": "raw_logprobs", "enforce_eager": False, "enable_prefix_caching": True,
                      "tensor_parallel_size": 1, "gpu_memory_utilization": 0.85}


def test_set_values_reach_the_engine():
    config = _generate("generate.gpus_per_actor=4", "generate.tensor_parallel_size=4", "generate.max_model_len=4096",
                       "generate.gpu_memory_utilization=0.6", "generate.prefix_caching=false")
    kwargs = vllm_engine_kwargs(config, on_cpu=False)
    assert (kwargs["tensor_parallel_size"], kwargs["max_model_len"], kwargs["gpu_memory_utilization"],
            kwargs["enable_prefix_caching"]) == (4, 4096, 0.6, False)


def test_the_cpu_build_sizes_its_kv_cache_itself_and_runs_eager():
    kwargs = vllm_engine_kwargs(_generate(), on_cpu=True)
    assert "gpu_memory_utilization" not in kwargs and kwargs["enforce_eager"] is True


@pytest.mark.parametrize("overrides, message", [
    (("generate.tensor_parallel_size=2", "generate.gpus_per_actor=1"), "generate.gpus_per_actor: must be >= "
                                                                         "generate.tensor_parallel_size=2"),
    (("generate.tensor_parallel_size=0",), "generate.tensor_parallel_size"),
    (("generate.gpu_memory_utilization=1.5",), "generate.gpu_memory_utilization: must be in (0, 1]"),
    (("generate.max_model_len=0",), "generate.max_model_len: must be > 0 or null"),
])
def test_bad_engine_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _generate(*overrides)


def test_tensor_parallel_needs_the_vllm_backend():
    with pytest.raises(ConfigError, match="needs generate.backend=vllm"):
        load_config(None, ["generate.tensor_parallel_size=2", "generate.gpus_per_actor=2"])
