"""Tests for rayalign.models and rayalign.tiny: the tiny offline model and the policy/reference loaders.

No Ray, no network. Everything is built from `make_tiny_model` in a few seconds.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from rayalign.models import (
    PAD_TOKEN_IF_NO_EOS,
    add_make_tiny_model_arguments,
    build_tiny_model,
    count_parameters,
    load_model,
    load_policy_and_reference,
    load_tokenizer,
    looks_local,
    make_tiny_model,
    run_make_tiny_model,
)
from rayalign.tiny import EOS_TOKEN, builtin_corpus, save_tiny_model, train_bpe

INPUT_IDS = torch.tensor([[5, 17, 200, 3, 99, 0], [0, 1, 2, 3, 4, 5]])


def logits(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def seed1_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_seed1"), seed=1)


def test_tiny_model_reloads_with_identical_logits(tmp_path):
    model, tokenizer = build_tiny_model()
    save_tiny_model(model, tokenizer, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert torch.equal(logits(model), logits(reloaded))
    text = "\n\nHuman: How was the movie?\n\nAssistant: It was great. Score: 5"
    assert reloaded_tok(text).input_ids == tokenizer(text).input_ids
    assert reloaded_tok.decode(reloaded_tok(text).input_ids) == text


def test_tiny_model_config_and_files(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.head_dim == 32 and cfg.hidden_size == cfg.num_attention_heads * 32
    # The built-in corpus is rich enough to fill the requested vocabulary exactly.
    assert cfg.vocab_size == len(tokenizer) == 512
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tokenizer.pad_token_id == eos
    assert cfg.eos_token_id == cfg.bos_token_id == cfg.pad_token_id == eos
    gen = model.generation_config
    assert gen.eos_token_id == gen.bos_token_id == gen.pad_token_id == eos
    assert tokenizer.padding_side == "right"
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()


def test_same_seed_gives_identical_files(tiny_model_dir, tmp_path):
    make_tiny_model(tmp_path)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "model.safetensors", "generation_config.json"]:
        assert (tmp_path / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_bpe_training_is_identical_in_a_fresh_process():
    # Another process has other hash seeds (Python's and the tokenizers library's Rust HashMaps), which
    # is where nondeterministic BPE training would show. Only `tokenizers` is imported there: fast.
    code = "from rayalign.tiny import builtin_corpus, train_bpe; print(train_bpe(builtin_corpus()).to_str())"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True)
    assert other.stdout.strip() == train_bpe(builtin_corpus()).to_str()


def test_different_seed_changes_weights_not_tokenizer(tiny_model_dir, seed1_dir):
    assert (seed1_dir / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    a = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(seed1_dir).state_dict()
    assert a.keys() == b.keys()
    # Norm weights start at ones in every seed; every randomly initialised matrix must differ.
    random_keys = [k for k in a if a[k].dim() == 2]
    assert len(random_keys) > 0
    assert all(not torch.equal(a[k], b[k]) for k in random_keys)


def test_seed_does_not_touch_global_rng():
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    build_tiny_model(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_digits_and_angle_brackets_are_single_tokens(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    single = {}
    for char in "0123456789<>":
        ids = tokenizer.encode(char, add_special_tokens=False)
        assert len(ids) == 1, (char, ids)
        single[char] = ids[0]
    assert len(set(single.values())) == 12
    # In context too: isolated by the pre-tokenizer, so no merge can swallow them.
    for text in ["3<text>", "Score: 42 > 7", "<review>5</review>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert [i for i in ids if i in single.values()] == [single[c] for c in text if c in single], text
        assert tokenizer.decode(ids) == text


def test_chat_template_renders_hh_turns(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "How was the movie?"}]
    rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered == "\n\nHuman: How was the movie?\n\nAssistant:"
    full = prompt + [{"role": "assistant", "content": "It was great."}]
    assert tokenizer.apply_chat_template(full, tokenize=False) == rendered + " It was great."


@pytest.mark.parametrize("side", ["left", "right"])
def test_load_tokenizer_padding_side(tiny_model_dir, side):
    tokenizer = load_tokenizer(tiny_model_dir, padding_side=side)
    assert tokenizer.padding_side == side
    batch = tokenizer(["a", "the movie was great"], padding=True)
    short_mask = batch["attention_mask"][0]
    assert 0 in short_mask
    assert short_mask[0 if side == "left" else -1] == 0
    assert short_mask[-1 if side == "left" else 0] == 1
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(tiny_model_dir, padding_side="middle")


def _tokenizer_dir(tiny_model_dir, out, **special_tokens):
    """The tiny tokenizer re-saved with only `special_tokens` (no pad) plus the tiny model's weights."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"), **special_tokens)
    assert tok.pad_token is None
    tok.save_pretrained(out)
    for name in ["config.json", "model.safetensors", "generation_config.json"]:
        shutil.copy(tiny_model_dir / name, out / name)
    return out


def test_tokenizer_without_pad_uses_eos(tiny_model_dir, tmp_path):
    path = _tokenizer_dir(tiny_model_dir, tmp_path, eos_token=EOS_TOKEN)
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token == EOS_TOKEN and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert len(tokenizer) == 512


def test_tokenizer_without_pad_or_eos_adds_pad_and_resizes(tiny_model_dir, tmp_path):
    path = _tokenizer_dir(tiny_model_dir, tmp_path)
    policy, reference, tokenizer = load_policy_and_reference(path)
    assert tokenizer.pad_token == PAD_TOKEN_IF_NO_EOS and len(tokenizer) == 513
    for model in (policy, reference):
        assert model.get_input_embeddings().weight.shape[0] == 513
        assert model.get_output_embeddings().weight.shape[0] == 513
        assert model.config.pad_token_id == tokenizer.pad_token_id == 512
    # The new rows are deterministic, so policy and reference still agree exactly (also on the pad id).
    ids = torch.cat([INPUT_IDS, torch.full((2, 1), 512)], dim=1)
    assert torch.equal(logits(policy, ids), logits(reference, ids))
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).get_input_embeddings().weight
    assert torch.equal(policy.get_input_embeddings().weight[:512], original)


def test_load_policy_and_reference_freezes_reference(tiny_model_dir, seed1_dir):
    policy, reference, tokenizer = load_policy_and_reference(tiny_model_dir, padding_side="left")
    assert tokenizer.padding_side == "left"
    assert not policy.training and not reference.training
    assert all(p.requires_grad for p in policy.parameters())
    assert not any(p.requires_grad for p in reference.parameters())
    assert policy is not reference
    assert torch.equal(logits(policy), logits(reference))

    loaded = load_policy_and_reference(tiny_model_dir, seed1_dir)
    assert not torch.equal(logits(loaded.policy), logits(loaded.reference))
    assert torch.equal(logits(loaded.policy), logits(policy))


def test_load_model_dtype(tiny_model_dir):
    model = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert not model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_model_dir, dtype="fp8")


@pytest.mark.parametrize("path", ["./no_such_model", "/no/such/model", "~/no_such_rayalign_model",
                                  "runs/iter0/policy", Path("missing_model")])
def test_missing_local_path_names_the_path(path):
    assert looks_local(path)
    for load in (load_model, load_tokenizer, load_policy_and_reference):
        with pytest.raises(ValueError, match="does not exist") as info:
            load(path)
        assert os.fspath(path) in str(info.value)


def test_hub_ids_do_not_look_local():
    assert not looks_local("gpt2")
    assert not looks_local("Qwen/Qwen2.5-0.5B-Instruct")


def _parse(argv):
    return add_make_tiny_model_arguments(argparse.ArgumentParser()).parse_args(argv)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_cli_with_corpus(tmp_path, capsys, suffix):
    docs = builtin_corpus()[:60] + ["A small corpus of my own, with digits 0 1 2 3 4 5 6 7 8 9."]
    corpus = tmp_path / f"corpus{suffix}"
    if suffix == ".jsonl":
        lines = [json.dumps({"text": d}) for d in docs]
    else:
        lines = [d.replace("\n", " ") for d in docs]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "model"
    args = _parse([str(out), "--corpus", str(corpus), "--layers", "1", "--hidden", "32", "--heads", "1",
                   "--vocab-size", "300", "--max-position", "128", "--seed", "3"])
    assert run_make_tiny_model(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tokenizer) <= 300
    n_params = count_parameters(model)
    printed = capsys.readouterr().out
    print(printed)  # the parameter count, visible with pytest -s
    assert f"{n_params:,} parameters" in printed


def test_bad_corpus_and_hidden_heads_fail_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"hidden \(64\) must equal heads \(3\) \* head_dim \(32\)"):
        make_tiny_model(tmp_path / "m", hidden=64, heads=3)
    assert run_make_tiny_model(_parse([str(tmp_path / "m"), "--hidden", "96"])) == 2
    assert "must equal heads" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        make_tiny_model(tmp_path / "m", corpus=bad)
    with pytest.raises(ValueError, match="does not exist"):
        make_tiny_model(tmp_path / "m", corpus=tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path / "m", vocab_size=100)


def test_import_is_cheap():
    code = ("import sys, rayalign.models; "
            "heavy = [m for m in ('ray', 'vllm', 'deepspeed', 'torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_save_weights_writes_the_final_dtype_and_says_so(tiny_model_dir, tmp_path, dtype):
    """A bf16 run's final/ is 16-bit, and config.json says so: a plain `from_pretrained` loads bf16 weights
    equal to the float32 master weights rounded once; a float32 run's final/ is the weights as they are."""
    from safetensors.torch import load_file

    from rayalign.models import save_weights

    model = load_model(str(tiny_model_dir))
    save_weights(model, tmp_path / "final", dtype=dtype)
    saved = load_file(tmp_path / "final" / "model.safetensors")
    expected = dtype or torch.float32
    assert {v.dtype for v in saved.values()} == {expected}
    assert json.loads((tmp_path / "final" / "config.json").read_text())["dtype"] == str(expected).split(".")[1]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert reloaded.dtype == expected
    for name, value in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], value.to(expected), atol=0, rtol=0, msg=name)


def test_saving_a_model_does_not_import_deepspeed(tiny_model_dir, tmp_path):
    """transformers' save_pretrained unwraps through accelerate, which imports deepspeed (~1 s a process) just for an
    isinstance check: `save_weights` skips that while deepspeed is not loaded; the saved model is unchanged."""
    code = ("import sys, torch; from rayalign.models import load_model, save_weights; "
            "import accelerate.utils.other as unwrap\n"
            f"model = load_model({str(tiny_model_dir)!r}); save_weights(model, {str(tmp_path / 'saved')!r})\n"
            "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'\n"
            "assert unwrap.is_deepspeed_available.__name__ == 'is_deepspeed_available'\n"
            f"again = load_model({str(tmp_path / 'saved')!r})\n"
            "for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):\n"
            "    assert torch.equal(a, b), name\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
