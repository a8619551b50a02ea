"""What bench_update.py's runs are given, and how their work is counted: the pairs, the model, the TRL settings.

The pairs are HH's (from ../shared) or synthetic ones of varying length, cut in text at a whitespace so that
neither trainer truncates them; the model is `--arch`'s real shape or a small Llama, random weights, with a
BPE tokenizer trained on the pairs. Work is counted in real (non-pad) tokens and in model FLOPs per real token
(PaLM's count, attention included). Nothing here is timed, run or reported: bench_update.py does that.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import torch

# The checkout's sibling ../shared (where the data sets are kept), as bench_update.py always looked for it.
HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
# DPOConfig overrides per TRL variant. "default" is TRL's defaults (gradient checkpointing on, a reference
# forward in every step); the others measure how much of the gap one default accounts for.
TRL_VARIANTS = {"default": {}, "no_gc": {"gradient_checkpointing": False},
                "no_gc_precompute": {"gradient_checkpointing": False, "precompute_ref_log_probs": True}}


def synthetic_pairs(count: int, seed: int = 0) -> list[dict]:
    """HH-shaped pairs, log-normal lengths (median ~40 prompt words, ~30 per completion), Zipf-like words."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(rng.randint(1, 9))) for _ in range(4000)]

    def text(median: float) -> str:
        n = max(1, int(rng.lognormvariate(math.log(median), 0.7)))
        return " ".join(words[min(int(10 * (rng.paretovariate(1.0) - 1)), len(words) - 1)] for _ in range(n))

    return [{"prompt": f"\n\nHuman: {text(40)}?\n\nAssistant:", "chosen": f" {text(30)}.",
             "rejected": f" {text(30)}."} for _ in range(count)]


def load_pairs(count: int) -> tuple[list[dict], str]:
    if HH_FILE.is_file():
        from rayalign.data import load_rows

        rows = load_rows(HH_FILE).rows
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows], f"HH ({HH_FILE.name})"
    return synthetic_pairs(max(count * 2, 512)), "synthetic (HH file absent)"


def _cut(tokenizer, text: str, limit: int, keep_end: bool) -> str:
    """`text` cut at a whitespace so it encodes to <= `limit` tokens, keeping its end or its start."""
    while True:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        n, offsets = len(enc["input_ids"]), enc["offset_mapping"]
        if n <= limit:
            return text
        # Cut before a whitespace: the pre-tokenizer splits there, so the kept part encodes the same alone.
        if keep_end:
            found = re.search(r"\s", text[offsets[n - limit][0]:])
            start = offsets[n - limit][0] + found.start() if found else len(text)
            text = text[start:] if start > 0 else text[1:]
        else:
            spaces = [m.start() for m in re.finditer(r"\s", text[:offsets[limit][0] + 1])]
            text = text[:spaces[-1]] if spaces and spaces[-1] > 0 else ""


def fit_pairs(rows: list[dict], tokenizer, *, prompt_len: int, completion_len: int, count: int) -> list[dict]:
    """The first `count` usable pairs, cut in text so that neither trainer truncates (EOS counts in completions)."""
    fitted = []
    for row in rows:
        prompt = _cut(tokenizer, row["prompt"], prompt_len, keep_end=True)
        chosen, rejected = (_cut(tokenizer, row[k], completion_len - 1, keep_end=False) for k in ("chosen", "rejected"))
        if prompt.strip() and chosen.strip() and rejected.strip():
            fitted.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        if len(fitted) == count:
            return fitted
    raise ValueError(f"only {len(fitted)} usable pairs, need {count}")


def build_model(args, texts: list[str]):
    """A BPE tokenizer trained on `texts` and a random model: `--arch`'s real shape (its full vocabulary: the
    tokenizer's ids use the first rows), or a LlamaForCausalLM (head_dim = hidden / heads, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.tiny import train_tokenizer

    tokenizer = train_tokenizer(texts, args.vocab_size, max_length=1 << 20)
    eos = tokenizer.eos_token_id
    # float32 weights on every device: on a GPU the step runs as train.precision=bf16 does (bf16 autocast over
    # float32 master weights and AdamW state, `bench_update.run_rayalign`), not as pure bf16 weights.
    dtype = torch.float32
    if args.arch != "none":
        from rayalign.arch import build_arch_model

        model = build_arch_model(args.arch, seed=0, device=args.device)
        model.config.bos_token_id = model.config.eos_token_id = model.config.pad_token_id = eos
        return model.to(dtype=dtype), tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         head_dim=args.hidden // args.heads, intermediate_size=4 * args.hidden,
                         max_position_embeddings=max(512, args.max_length), bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(device=args.device, dtype=dtype), tokenizer


def pair_tokens(item: dict) -> int:
    return 2 * len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"])


def flops_per_token(model, matmul_params: int, rows: list[dict], tokenizer) -> tuple[float, float]:
    """Model FLOPs per real token: (trained: 6 x params + 12 x layers x width x T, a reference forward: 2 x params
    + 4 x layers x width x T), T averaged over tokens (sum T^2 / sum T over the sequences), as PaLM's MFU counts
    attention (the full T x T product, not the causal half)."""
    lengths = [len(tokenizer(r["prompt"] + r[side], add_special_tokens=False)["input_ids"]) + 1
               for r in rows for side in ("chosen", "rejected")]
    config = model.config
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 4 * config.num_hidden_layers * width * sum(t * t for t in lengths) / sum(lengths)  # forward
    return 6 * matmul_params + 3 * attention, 2 * matmul_params + attention
