"""GPU checks that need the whole stack: Ray, DeepSpeed or vLLM on a CUDA machine (`gpu` marker).

Skipped without CUDA (every `gpu` test) and, each, without the package it needs: the lent GPU machine of
`benchmarks/gpu_check.sh` has none of them, so these run on a user's GPU machine with the `vllm` extra:
`pytest -m gpu tests/test_gpu_stack.py`.
- vLLM on the GPU: an engine that offloads between passes sleeps (the GPU's free memory rises by most of its
  share), takes weights pushed while asleep at its wake-up, and then samples the new weights' log-probs;
- ZeRO-3 partitioned loading over two GPUs (nccl): each rank holds half the model, never the whole;
- the loop reduced, on one GPU, as configs/gpu/qwen0.5b_ultrafeedback_spa.yaml places it: the generator and
  the judge live for the run and offload between passes, the reference scorer and training take half the GPU
  each (Ray's accounting); with the HF generator and with vLLM.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import QUICKSTART_REDUCED, REPO, perturbed_copy

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CO_LOCATED = ("generate.persistent=true", "generate.offload_between_passes=true", "generate.gpus_per_actor=0.25",
              "judge.persistent=true", "judge.offload_between_passes=true", "judge.gpus_per_actor=0.25",
              "ref.gpus_per_actor=0.5", "train.use_gpu=true", "train.gpus_per_worker=0.5", "train.precision=bf16")


def _hf_token_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + token_ids], device=model.device)
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(token_ids) - 1, device=model.device)
    return logps[positions, torch.tensor(token_ids, device=model.device)].cpu()


def test_vllm_engine_sleeps_between_passes_and_wakes_with_the_pushed_weights(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    from rayalign.config import GenerateConfig
    from rayalign.generator_pool import SamplerHost
    from rayalign.models import load_model, load_tokenizer

    share = 0.3
    config = GenerateConfig(backend="vllm", num_samples=2, max_new_tokens=8, seed=3, dtype="float32",
                            gpus_per_actor=1, gpu_memory_utilization=share, persistent=True,
                            offload_between_passes=True)
    host = SamplerHost(str(tiny_model_dir), config, None, "a")
    sampler = host.generator.sampler
    assert sampler.sleeps
    prompt = "\n\nHuman: Review Night Train.\n\nAssistant:"
    before = sampler.sample([prompt], [0])[0]
    free_awake = torch.cuda.mem_get_info()[0]
    host.release()
    freed = torch.cuda.mem_get_info()[0] - free_awake
    total = torch.cuda.mem_get_info()[1]
    assert freed > 0.5 * share * total, (freed, total)  # the KV cache and the weights left the GPU
    state_b = perturbed_copy(tiny_model_dir, tmp_path / "b")
    host.update_weights(state_b, "b")  # as the training stage's push: the engine is asleep, the weights wait
    assert host.status() == {"tag": "a", "released": True, "pending": "b"}
    host.hold(str(tmp_path / "b"), "b")  # the next pass: wake, then the waiting weights in place
    after = sampler.sample([prompt], [0])[0]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    new = load_model(str(tmp_path / "b"), device="cuda").eval()
    for sample in after:
        diff = (torch.tensor(sample.logprobs) - _hf_token_logprobs(new, prompt_ids, sample.token_ids)).abs().max()
        assert diff < 1e-3, diff
    assert [s.token_ids for s in after] != [s.token_ids for s in before]
    sampler.close()


def test_zero3_partitioned_loading_over_two_gpus(tiny_model_dir, tmp_path):
    pytest.importorskip("deepspeed")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs (one ZeRO-3 rank on each)")
    from tests.test_zero3_loading import assert_each_rank_held_its_shard, run_ranks

    assert_each_rank_held_its_shard(run_ranks(tiny_model_dir, tmp_path, backend="nccl"))


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_reduced_loop_on_one_gpu_with_co_located_engines(backend, tmp_path):
    pytest.importorskip("ray")
    if backend == "vllm":
        pytest.importorskip("vllm")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rayalign.cli", "run", "configs/quickstart.yaml", f"run.dir={run_dir}",
               *QUICKSTART_REDUCED, *CO_LOCATED, f"generate.backend={backend}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 3
    for kind in ("generator", "judge"):  # one engine and one judge for the run, every later policy pushed
        assert f"{kind}: 1 engine(s) started for the run; 0 weight load(s) from files" in result.stdout, \
            result.stdout[-4000:]
