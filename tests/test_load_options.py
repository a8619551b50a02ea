"""`model.revision`, `model.trust_remote_code` and `model.attn_implementation` reach every model load.

A hub id is served from a local Hugging Face cache built here (no download): `rayalign-test/tiny` at `main` is
the tiny model with seed 0, at `v1` one with seed 1 and a 300-token vocabulary, so the loaded weights and
tokenizer show which revision was read. The real stage classes (a training `Worker` under Ray Train's local
mode, the `Judge`, the `Generator`, the `PairEncoder`, the `ReferenceScorer`, SFT) are built in-process with
`attn_implementation=eager` and `revision=v1`, and their models are inspected.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from rayalign.config import ConfigError
from rayalign.config_loader import config_to_dict, load_config
from rayalign.models import LoadOptions, check_model_name, load_model, load_tokenizer, make_tiny_model
from rayalign.samplers import vllm_load_kwargs

HUB_ID = "rayalign-test/tiny"
V1_VOCAB = 300


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hugging Face hub cache holding HUB_ID at two revisions (as `snapshot_download` lays it out)."""
    cache = tmp_path_factory.mktemp("hf_cache")
    repo = cache / "models--rayalign-test--tiny"
    (repo / "refs").mkdir(parents=True)
    for ref, commit, extra in (("main", "a" * 40, {}), ("v1", "b" * 40, {"seed": 1, "vocab_size": V1_VOCAB})):
        make_tiny_model(repo / "snapshots" / commit, **extra)
        (repo / "refs" / ref).write_text(commit)
    return cache, repo / "snapshots" / ("b" * 40)


@pytest.fixture
def hub(hub_cache, monkeypatch):
    """HUB_ID loadable offline; returns the local snapshot of revision v1 (the expected weights)."""
    import huggingface_hub.constants

    cache, v1 = hub_cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return v1


def embeddings(model) -> torch.Tensor:
    return model.get_input_embeddings().weight


def eager_v1_config(tmp_path, *extra):
    return load_config(None, [f"model.policy={HUB_ID}", "model.revision=v1", "model.attn_implementation=eager",
                              f"run.dir={tmp_path / 'run'}", *extra])


def test_options_from_the_config_and_local_directories_have_no_revision(tiny_model_dir):
    config = load_config(None, ["model.revision=v1", "model.trust_remote_code=true", "model.attn_implementation=sdpa"])
    options = LoadOptions.of(config.model)
    assert options == LoadOptions(revision="v1", trust_remote_code=True, attn_implementation="sdpa")
    assert options.hub_kwargs(HUB_ID) == {"trust_remote_code": True, "revision": "v1"}
    assert options.hub_kwargs(str(tiny_model_dir)) == {"trust_remote_code": True}
    assert options.model_kwargs(HUB_ID) == {"trust_remote_code": True, "revision": "v1", "attn_implementation": "sdpa"}
    assert LoadOptions.of(load_config(None, []).model) == LoadOptions()
    # vLLM takes the same revision (model and tokenizer) and trust_remote_code; attention is its own choice
    assert vllm_load_kwargs(HUB_ID, HUB_ID, options) == {"trust_remote_code": True, "revision": "v1",
                                                        "tokenizer_revision": "v1"}
    assert vllm_load_kwargs(str(tiny_model_dir), HUB_ID, options) == {"trust_remote_code": True,
                                                                      "tokenizer_revision": "v1"}


@pytest.mark.parametrize("override, message", [
    ("model.attn_implementation=flash", "model.attn_implementation: must be one of sdpa, eager, flash_attention_2"),
    ("model.attn_implementation=Eager", "model.attn_implementation: must be one of"),
])
def test_unknown_attention_is_a_config_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_revision_selects_the_hub_weights_and_tokenizer(hub):
    v1 = load_model(hub)
    main, at_v1 = load_model(HUB_ID), load_model(HUB_ID, LoadOptions(revision="v1"))
    assert torch.equal(embeddings(at_v1), embeddings(v1))
    assert embeddings(main).shape[0] == 512 and embeddings(at_v1).shape[0] == V1_VOCAB
    assert len(load_tokenizer(HUB_ID, LoadOptions(revision="v1"))) == V1_VOCAB
    assert len(load_tokenizer(HUB_ID)) == 512
    check_model_name(HUB_ID, "model.policy", revision="v1")
    with pytest.raises(ValueError, match=r"model.policy: .*rayalign-test/tiny.* at model.revision='v9'"):
        check_model_name(HUB_ID, "model.policy", revision="v9")


def test_attention_default_is_transformers_choice_and_eager_is_passed(tiny_model_dir):
    assert load_model(tiny_model_dir).config._attn_implementation == "sdpa"
    eager = load_model(tiny_model_dir, LoadOptions(attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"


def test_flash_attention_without_its_package_names_the_key(tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here: the failure this checks cannot happen")
    with pytest.raises(ConfigError, match="model.attn_implementation: flash_attention_2 cannot load"):
        load_model(tiny_model_dir, LoadOptions(attn_implementation="flash_attention_2"))


def test_judge_generator_encoder_and_scorer_load_with_the_options(hub, tmp_path):
    from rayalign.generate import Generator
    from rayalign.judge import Judge
    from rayalign.prepare import PairEncoder, ReferenceScorer

    config = eager_v1_config(tmp_path)
    expected = embeddings(load_model(hub))
    judge = Judge(HUB_ID, HUB_ID, config)
    generator = Generator(HUB_ID, config.generate, None, LoadOptions.of(config.model))
    scorer = ReferenceScorer(HUB_ID, config, pad_token_id=0, kind="pairs")
    for model in (judge.policy, judge.sft, generator.sampler.model, scorer.model):
        assert model.config._attn_implementation == "eager"
        assert torch.equal(embeddings(model), expected)
    encoder = PairEncoder(HUB_ID, 16, 16, LoadOptions.of(config.model), kind="pairs")
    for tokenizer in (judge.tokenizer, generator.sampler.tokenizer, encoder.tokenizer):
        assert len(tokenizer) == V1_VOCAB


def test_sft_loads_with_the_options(hub, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rayalign.sft import run_sft

    calls = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def recording(cls, path, *args, **kwargs):  # records the call, then loads for real
        calls.append((path, kwargs))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(recording))
    options = LoadOptions.of(eager_v1_config(tmp_path).model)
    out = run_sft(HUB_ID, [("Review: ", "a fine film.")] * 4, tmp_path / "sft", epochs=1, batch_size=4,
                  log=lambda _: None, load=options)
    assert [(path, kwargs["revision"], kwargs["attn_implementation"]) for path, kwargs in calls] == [
        (HUB_ID, "v1", "eager")]
    assert load_model(out).get_input_embeddings().weight.shape[0] == V1_VOCAB


def local_loop_config(config, policy: str, tmp_path, *, pairs: int = 4) -> dict:
    """Ray Train's `train_loop_config` for `rayalign.train_loop.Worker`, as `rayalign.train` builds it, with a
    prepared Parquet of `pairs` gold pairs tokenized by the real `PairEncoder` (no Ray, no reference columns:
    give `ref.cache=false`)."""
    from rayalign.data import write_rows_parquet
    from rayalign.prepare import PairEncoder
    from rayalign.stage_inputs import StageInputs
    from rayalign.tasks.sentiment import gold_pairs

    frame = pd.DataFrame(gold_pairs(pairs, seed=0))[["prompt", "chosen", "rejected"]]
    encoded = PairEncoder(policy, 32, 32, LoadOptions.of(config.model), kind="pairs")(
        frame.assign(pair_index=range(len(frame))))
    prepared = tmp_path / "train.parquet"
    write_rows_parquet(encoded.to_dict("records"), prepared)
    Path(config.run.dir).mkdir(parents=True, exist_ok=True)
    return {"config": config_to_dict(config), "inputs": StageInputs.from_config(config).to_dict(),
            "train_path": str(prepared), "eval_path": None, "policy_path": policy, "tokenizer_path": policy,
            "reference_path": policy, "data_kind": "pairs", "kill_worker_at": None}


def run_locally(train_fn, loop_config: dict) -> None:
    """`train_fn(loop_config)` under Ray Train's local mode (num_workers=0): in this process, no cluster."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    TorchTrainer(train_fn, train_loop_config=loop_config, scaling_config=ScalingConfig(num_workers=0),
                 run_config=RunConfig(name="rayalign-local")).fit()


def test_a_training_worker_loads_policy_reference_and_tokenizer_with_the_options(hub, tmp_path):
    """The real `rayalign.train_loop.Worker`, built by Ray Train's local mode."""
    from rayalign.train_loop import Worker

    config = eager_v1_config(tmp_path, "ref.cache=false", "train.global_batch_size=2", "train.num_workers=1")
    seen = {}

    def build(loop_config):
        worker = Worker(loop_config)
        seen.update(policy=worker.policy, reference=worker.reference, tokenizer=worker.tokenizer)

    run_locally(build, local_loop_config(config, HUB_ID, tmp_path))
    expected = embeddings(load_model(hub))
    for name in ("policy", "reference"):
        assert seen[name].config._attn_implementation == "eager", name
        assert torch.equal(embeddings(seen[name]).detach(), expected), name
    assert len(seen["tokenizer"]) == V1_VOCAB


def test_the_reference_cache_key_tells_revisions_and_attention_apart():
    from rayalign.prepare import cache_key

    frame = pd.DataFrame({"prompt": ["p"], "chosen": [" a"], "rejected": [" b"]})

    def key(*overrides):
        return cache_key(frame, load_config(None, list(overrides)), kind="pairs", reference_path=HUB_ID,
                         tokenizer_path=HUB_ID)

    keys = {key(), key("model.revision=v1"), key("model.revision=v2"), key("model.attn_implementation=eager")}
    assert len(keys) == 4
    assert key() == key("model.trust_remote_code=true")  # what code runs is not what it computes
