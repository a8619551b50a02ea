"""`rayalign.arch`: real architectures' exact shapes, counted on the meta device, written config-only.

The parameter counts are derived by hand from the published shapes below (and equal the known totals of the
real checkpoints: Qwen2.5-0.5B 494,032,768 with tied embeddings, Llama-3-8B 8,030,261,248), then compared with
the model transformers builds from our config. Nothing here allocates real weights.
"""

from __future__ import annotations

import pytest

from rayalign.arch import ARCHS, arch_config, build_arch_model, count_arch_parameters


def hand_count(vocab, hidden, layers, heads, kv_heads, mlp, *, qkv_bias: bool, tied: bool) -> int:
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    attention = hidden * (hidden + 2 * kv) + (hidden + 2 * kv) * qkv_bias + hidden * hidden  # q, k, v (+bias), o
    layer = attention + 3 * hidden * mlp + 2 * hidden  # gate, up, down; two RMSNorms
    return vocab * hidden * (1 if tied else 2) + layers * layer + hidden  # embeddings (+ head), final norm


QWEN = hand_count(151_936, 896, 24, 14, 2, 4_864, qkv_bias=True, tied=True)
LLAMA = hand_count(128_256, 4_096, 32, 32, 8, 14_336, qkv_bias=False, tied=False)


def test_hand_counts_are_the_published_totals():
    assert QWEN == 494_032_768
    assert LLAMA == 8_030_261_248


@pytest.mark.parametrize("name, expected, model_class", [("qwen2.5-0.5b", QWEN, "Qwen2ForCausalLM"),
                                                         ("llama-3-8b", LLAMA, "LlamaForCausalLM")])
def test_meta_model_has_the_real_parameter_count(name, expected, model_class):
    assert count_arch_parameters(name) == expected
    model = build_arch_model(name, device="meta")
    assert type(model).__name__ == model_class
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    assert tied == (name == "qwen2.5-0.5b")


def test_configs_are_the_published_shapes():
    qwen, llama = arch_config("qwen2.5-0.5b"), arch_config("llama-3-8b")
    assert (qwen.vocab_size, qwen.hidden_size, qwen.num_hidden_layers, qwen.num_attention_heads,
            qwen.num_key_value_heads, qwen.intermediate_size, qwen.max_position_embeddings) == (
        151_936, 896, 24, 14, 2, 4_864, 32_768)
    assert qwen.tie_word_embeddings and qwen.rope_parameters["rope_theta"] == 1e6
    assert (llama.vocab_size, llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads,
            llama.num_key_value_heads, llama.intermediate_size) == (128_256, 4_096, 32, 32, 8, 14_336)
    assert not llama.tie_word_embeddings and llama.rope_parameters["rope_theta"] == 5e5
    assert sorted(ARCHS) == ["llama-3-8b", "qwen2.5-0.5b"]


def cli(*argv) -> int:
    """`rayalign make-tiny-model ARGV` in-process: what the command runs."""
    from rayalign.cli import main

    return main(["make-tiny-model", *argv])


def test_config_only_directory_loads_as_the_architecture(tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from rayalign.models import load_tokenizer

    out = tmp_path / "llama-3-8b"
    assert cli(str(out), "--arch", "llama-3-8b", "--config-only") == 0
    assert "8,030,261,248 parameters" in capsys.readouterr().out
    assert not list(out.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(out)
    tokenizer = load_tokenizer(out)
    assert config.vocab_size == 128_256 and config.eos_token_id == tokenizer.eos_token_id == config.pad_token_id
    assert len(tokenizer) == 512  # the small BPE; its ids use the first rows of the 128,256
    import torch

    with torch.device("meta"):
        assert type(AutoModelForCausalLM.from_config(config)).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("argv, message", [
    (("--arch", "llama-3-8b"), "llama-3-8b: random weights are not written for this size (fp32: 32 GB); pass "
                               "--config-only"),
    (("--config-only",), "--config-only needs --arch"),
    (("--arch", "qwen2.5-0.5b", "--layers", "3"), "--layers: only for the tiny model"),
])
def test_bad_arch_arguments_fail_in_one_line(tmp_path, capsys, argv, message):
    assert cli(str(tmp_path / "out"), *argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
