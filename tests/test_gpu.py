"""GPU-only checks (`gpu` marker: skipped without CUDA; `benchmarks/gpu_check.sh` runs them on a GPU machine).

They need torch and transformers only (the lent GPU machine has no Ray, DeepSpeed or vLLM):
- the bf16 update keeps float32 master weights on the GPU, and they move at lr 5e-7;
- the chunked head on the GPU equals the model's full logits, gradients included;
- reference scoring, the judge's log-probs and HF generation run on the GPU when their stage is given one,
  and agree with the same computation on the CPU (float32 both: the device is what is tested, not bf16);
- persistent HF generator and judge hosts that offload between passes free the GPU and come back unchanged.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from rayalign.config_loader import load_config
from rayalign.tasks.sentiment import gold_pairs

pytestmark = pytest.mark.gpu
OFFLOADING = ["generate.persistent=true", "generate.offload_between_passes=true", "judge.persistent=true",
              "judge.offload_between_passes=true"]


def _config(*overrides: str):
    return load_config(None, ["data.max_prompt_length=64", "data.max_completion_length=32", *overrides])


def test_bf16_update_on_gpu_moves_float32_master_weights(tiny_model_dir):
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import train_pairs

    config = _config(f"model.policy={tiny_model_dir}", "optim.lr=5e-7", "optim.warmup_ratio=0",
                     "train.global_batch_size=4", "train.max_steps=2", "train.precision=bf16", "train.use_gpu=true")
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), device="cuda")
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    history = train_pairs(model, copy.deepcopy(model).requires_grad_(False), tokenizer, gold_pairs(8, seed=1), config)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert all(v.dtype == torch.float32 and v.is_cuda for v in model.state_dict().values())
    assert len(moved) > len(before) // 2, moved


def test_chunked_head_on_gpu_equals_the_full_logits(tiny_model_dir):
    from rayalign.data_kind import PAIRS
    from rayalign.encode import collate
    from rayalign.models import load_model, load_tokenizer
    from rayalign.oracle import encode_pairs
    from rayalign.step import sequence_scores

    tokenizer, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir), device="cuda").train()
    batch = collate(encode_pairs(gold_pairs(4, seed=3), tokenizer, _config()).items, PAIRS,
                    pad_token_id=tokenizer.pad_token_id)
    batch = {k: v.cuda() for k, v in batch.items()}
    results = []
    for chunk_rows in (5, 0):
        model.zero_grad(set_to_none=True)
        scores = sequence_scores(model, batch, chunk_rows=chunk_rows, want_entropy=True)
        scores.chosen.sum().backward()
        results.append((scores, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (chunked, chunked_grads), (full, full_grads) = results
    torch.testing.assert_close(chunked.chosen, full.chosen, atol=1e-4, rtol=0)
    torch.testing.assert_close(chunked.chosen_entropy, full.chosen_entropy, atol=1e-4, rtol=0)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


def test_reference_scorer_runs_on_its_gpu_and_matches_the_cpu(tiny_model_dir):
    from rayalign.data_kind import PAIRS
    from rayalign.encode import TEXT_FIELDS
    from rayalign.models import load_tokenizer
    from rayalign.prepare import PairEncoder, ReferenceScorer

    rows = gold_pairs(6, seed=2)
    frame = pd.DataFrame({"pair_index": range(len(rows)), **{f: [r[f] for r in rows] for f in TEXT_FIELDS[PAIRS]}})
    encoded = PairEncoder(str(tiny_model_dir), 64, 32, kind=PAIRS)(frame)
    pad = load_tokenizer(str(tiny_model_dir)).pad_token_id
    gpu = ReferenceScorer(str(tiny_model_dir), _config("ref.gpus_per_actor=1", "ref.dtype=float32"), pad, kind=PAIRS)
    assert gpu.model.device.type == "cuda"
    on_gpu, on_cpu = gpu(encoded), ReferenceScorer(str(tiny_model_dir), _config(), pad, kind=PAIRS)(encoded)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        assert torch.allclose(torch.tensor(on_gpu[column]), torch.tensor(on_cpu[column]), atol=1e-3), column
    bf16 = ReferenceScorer(str(tiny_model_dir), _config("ref.gpus_per_actor=1"), pad, kind=PAIRS)
    assert bf16.model.dtype == torch.bfloat16  # ref.dtype=auto on a GPU


def test_judge_and_hf_generation_run_on_their_gpu(tiny_model_dir):
    from rayalign.judge import Judge
    from rayalign.samplers import HFSampler

    config = _config("generate.gpus_per_actor=1", "generate.dtype=float32", "generate.max_new_tokens=8",
                     "judge.gpus_per_actor=1", "judge.dtype=float32")
    sampler = HFSampler(str(tiny_model_dir), config.generate)
    assert sampler.model.device.type == "cuda"
    prompts = ["\n\nHuman: Review Night Train.\n\nAssistant:", "\n\nHuman: What about Red Valley?\n\nAssistant:"]
    samples = sampler.sample(prompts, [0, 1])
    assert [len(s) for s in samples] == [2, 2] and all(x.token_ids for s in samples for x in s)
    batch = pd.DataFrame({"prompt_id": [0, 1], "prompt": prompts, "texts": [[x.text for x in s] for s in samples]})
    on_gpu = Judge(str(tiny_model_dir), str(tiny_model_dir), config)
    assert on_gpu.policy.device.type == "cuda" and on_gpu.sft.device.type == "cuda"
    gpu_rows, cpu_rows = on_gpu(batch), Judge(str(tiny_model_dir), str(tiny_model_dir), _config())(batch)
    for got, want in zip(gpu_rows["policy_logps"], cpu_rows["policy_logps"]):
        assert torch.allclose(torch.tensor(list(got)), torch.tensor(list(want)), atol=1e-3)


def test_offloading_hosts_free_the_gpu_between_passes_and_sample_and_judge_alike(tiny_model_dir):
    """`generate/judge.offload_between_passes` with HF hosts: released, their models leave the GPU (its memory
    falls by at least their weights); the next pass brings them back and samples and judges as before."""
    from rayalign.generator_pool import SamplerHost
    from rayalign.judge_pool import JudgeHost

    model = str(tiny_model_dir)
    config = _config("generate.gpus_per_actor=1", "generate.dtype=float32", "generate.max_new_tokens=8",
                     "judge.gpus_per_actor=1", "judge.dtype=float32", *OFFLOADING)
    prompts = pd.DataFrame({"prompt_id": [0, 1], "prompt": ["\n\nHuman: Review Night Train.\n\nAssistant:",
                                                            "\n\nHuman: What about Red Valley?\n\nAssistant:"]})
    sampler, judge = SamplerHost(model, config.generate, None, "a"), JudgeHost(model, model, config, "a")

    def one_pass() -> tuple[list, list]:
        sampler.hold(model, "a")  # as begin_pass and judge_batch do at a pass's start
        rows = sampler.generator(prompts)
        judged = judge.judge_batch(rows, model, "a")
        return [list(map(list, ids)) for ids in rows["token_ids"]], [list(x) for x in judged["policy_logps"]]

    before = one_pass()
    models = [sampler.generator.sampler.model, *judge.judge.held_models()]
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    torch.cuda.synchronize()
    on_device = torch.cuda.memory_allocated()
    sampler.release()
    judge.release()
    assert all(p.device.type == "cpu" for m in models for p in m.parameters())
    assert torch.cuda.memory_allocated() <= on_device - weights
    after = one_pass()
    assert all(p.is_cuda for m in models for p in m.parameters())
    assert after[0] == before[0]
    torch.testing.assert_close(torch.tensor(after[1]), torch.tensor(before[1]), atol=1e-5, rtol=0)
