"""Random-weight models with the exact shape of named real architectures, for tests and benchmarks, offline.

`rayalign make-tiny-model --arch NAME OUT` (or `make_arch_model`) writes a Hugging Face directory whose
config is the real model's shape (`ARCHS`), with seeded random weights, loadable by transformers, vLLM and
every rayalign stage like the hub model it imitates. Nothing is downloaded: only the shape is known here.

- `qwen2.5-0.5b`: Qwen2ForCausalLM, vocabulary 151,936, hidden 896, 24 layers, 14 attention heads with 2 KV
  heads (head_dim 64), MLP 4,864, tied embeddings, RoPE theta 1e6, 32,768 positions: 494,032,768 parameters.
- `llama-3-8b`: LlamaForCausalLM, vocabulary 128,256, hidden 4,096, 32 layers, 32 heads with 8 KV heads, MLP
  14,336, RoPE theta 5e5, untied: 8,030,261,248 parameters. Config only (`config_only=True`): its random
  fp32 weights would be 32 GB that no test or CPU benchmark needs; the config feeds `from_config` on the
  meta device (counting, memory planning) or vLLM's `load_format="dummy"`.

The tokenizer is rayalign's small byte-level BPE (`rayalign.tiny.train_tokenizer`: the built-in corpus or
`corpus`, at most `vocab_size` tokens, its chat template), not the real one, which cannot be rebuilt
offline. The model keeps the architecture's full vocabulary anyway, as real checkpoints pad their
embeddings past their tokenizer (Qwen2.5's tokenizer has 151,665 tokens for 151,936 rows): compute and
memory are the real model's, and the rows above the tokenizer's ids are simply never looked up. bos, eos
and pad are the tokenizer's one end-of-text token. It does not train anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

ARCHS = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151_936, hidden_size=896, intermediate_size=4_864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32_768, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1_000_000.0},
        rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, max_window_layers=21)),
    "llama-3-8b": ("LlamaConfig", dict(
        vocab_size=128_256, hidden_size=4_096, intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8_192, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 500_000.0},
        rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
CONFIG_ONLY = ("llama-3-8b",)  # weights too large to be worth writing at random


def arch_config(name: str, *, token_id: int | None = None):
    """The transformers config of architecture `name` (a key of `ARCHS`); `token_id`: bos/eos/pad."""
    import transformers

    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    class_name, shape = ARCHS[name]
    ids = {} if token_id is None else dict(bos_token_id=token_id, eos_token_id=token_id, pad_token_id=token_id)
    return getattr(transformers, class_name)(**shape, **ids, dtype="float32")


def build_arch_model(name: str, *, seed: int = 0, device: str | None = None):
    """A randomly initialised model of architecture `name` in eval mode; `device="meta"` allocates nothing
    (for counting parameters). Seeded without touching the caller's global RNG stream."""
    import torch
    from transformers import AutoModelForCausalLM

    config = arch_config(name)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def count_arch_parameters(name: str) -> int:
    """Parameters of architecture `name` (tied tensors once), counted on the meta device: no memory used."""
    from rayalign.tiny import count_parameters

    return count_parameters(build_arch_model(name, device="meta"))


def make_arch_model(out_dir: str | Path, name: str, *, corpus: str | Path | None = None, seed: int = 0,
                    vocab_size: int = 512, config_only: bool = False) -> Path:
    """Write architecture `name` with random weights (or, `config_only`, its config without weights) and the
    small tokenizer (see the module docstring) into `out_dir`; returns its path."""
    from transformers import GenerationConfig

    from rayalign.tiny import builtin_corpus, read_corpus, train_tokenizer

    if name in CONFIG_ONLY and not config_only:
        raise ValueError(f"{name}: random weights are not written for this size (fp32: "
                         f"{4 * count_arch_parameters(name) / 1e9:.0f} GB); pass --config-only")
    docs = read_corpus(corpus) if corpus is not None else builtin_corpus()
    config = arch_config(name)
    tokenizer = train_tokenizer(docs, vocab_size, max_length=config.max_position_embeddings)
    eos = tokenizer.eos_token_id
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    generation = GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if config_only:
        arch_config(name, token_id=eos).save_pretrained(out)
        generation.save_pretrained(out)
    else:
        model = build_arch_model(name, seed=seed)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.config, key, eos)
        model.generation_config = generation
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    what = "config only, no weights" if config_only else f"random weights (seed {seed})"
    (out / "README.md").write_text(
        f"The {name} architecture ({count_arch_parameters(name):,} parameters), {what}, written by "
        f"`rayalign make-tiny-model --arch {name}` for tests and benchmarks. The tokenizer is a small "
        f"byte-level BPE ({len(tokenizer)} tokens), not the real one. Untrained: its outputs are noise.\n")
    return out


# The tiny model's shape options (rayalign.tiny) and their defaults: --arch fixes the shape itself.
_TINY_SHAPE = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": None, "max_position": 512}


def run_make_arch_model(args) -> int:
    """`rayalign make-tiny-model --arch NAME OUT [--config-only] [--corpus F] [--seed N] [--vocab-size N]`."""
    shape = [f"--{key.replace('_', '-')}" for key, default in _TINY_SHAPE.items() if getattr(args, key) != default]
    problem = ("--config-only needs --arch" if not args.arch else
               f"{', '.join(shape)}: only for the tiny model; --arch {args.arch} has its own shape" if shape else None)
    if problem:
        print(f"make-tiny-model: error: {problem}", file=sys.stderr)
        return 2
    try:
        out = make_arch_model(args.out_dir, args.arch, corpus=args.corpus, seed=args.seed,
                              vocab_size=args.vocab_size, config_only=args.config_only)
    except ValueError as e:
        print(f"make-tiny-model: error: {e}", file=sys.stderr)
        return 2
    what = "config and tokenizer (no weights)" if args.config_only else "random weights and tokenizer"
    print(f"wrote {out}: {args.arch}, {count_arch_parameters(args.arch):,} parameters, {what}")
    return 0


def add_arch_arguments(parser):
    """`make-tiny-model`'s --arch and --config-only (rayalign.cli adds them next to rayalign.tiny's options)."""
    parser.add_argument("--arch", default=None, choices=sorted(ARCHS),
                        help="the exact shape of a real architecture, random weights (rayalign.arch); the shape "
                             "options above do not apply, --corpus/--vocab-size/--seed do")
    parser.add_argument("--config-only", action="store_true", help="with --arch: config and tokenizer, no weights")
    return parser
