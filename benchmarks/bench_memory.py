"""Peak resident memory of one DPO step at a real vocabulary size: rayalign's step against TRL's DPOTrainer.

Each trainer runs in its own fresh process (so one's peak is not the other's), on the same model (`--arch`'s
real shape with random weights: Qwen2.5-0.5B by default, vocabulary 151,936), the same pairs (cut to exactly
`--prompt-len` + `--completion-len` tokens by a BPE tokenizer trained on them) and the same batching: one
optimizer step over `--pairs` pairs in micro-batches of `--micro-batch`, with the reference log-probs computed
before the step (rayalign's reference pass; TRL's `precompute_ref_log_probs=True`), float32 on the CPU.

Memory options, both sides: gradient checkpointing on (TRL's default; `train.gradient_checkpointing=true`) and
the reference pass precomputed. rayalign's head runs in chunks of `model.head_chunk_tokens` positions on
completion tokens only (`rayalign.core.head`); TRL materialises the full logits of each micro-batch. TRL's
other memory options do not apply here: Liger kernels and activation offloading need a GPU, and its
`padding_free` needs flash attention.

The peak is the process's maximum resident set size (`ru_maxrss`), model and optimizer state included; the
model's own share (after loading, before the step) is printed too. The last line is one JSON object:
`peak_rss_gb`, `trl_peak_rss_gb` (or `"trl": "out of memory"` when TRL's process was killed), the ratio, the
seconds each took and the settings. No timing or memory is asserted (tests/test_bench_memory.py only checks
a tiny run ends with that line).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for path in (str(REPO), str(BENCHMARKS)):
    if path not in sys.path:  # a plain script run from a checkout; bench_update is the shared toolbox
        sys.path.insert(0, path)

import bench_update  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="qwen2.5-0.5b", help="a rayalign.arch shape, or 'none' for a small Llama")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward (accumulated)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--trainers", default="rayalign,trl")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    # a small Llama for --arch none (the smoke test)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=8192, help="the tokenizer's vocabulary (the model's: --arch)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pairs % args.micro_batch:
        p.error(f"--pairs {args.pairs} is not a multiple of --micro-batch {args.micro_batch}")
    args.device, args.max_length, args.batch_size = "cpu", args.prompt_len + args.completion_len, args.pairs
    return args


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def long_pairs(count: int, words: int, seed: int = 0) -> list[dict]:
    """Pairs whose prompt and completions are `words` random words each: longer than any asked length, so
    that cutting them (`bench_update.fit_pairs`) leaves them at the asked token counts."""
    import random

    rng = random.Random(seed)
    vocab = ["".join(rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(rng.randint(2, 7))) for _ in range(3000)]

    def text() -> str:
        return " ".join(rng.choice(vocab) for _ in range(words))

    return [{"prompt": f"\n\nHuman: {text()}?\n\nAssistant:", "chosen": f" {text()}.", "rejected": f" {text()}."}
            for _ in range(count)]


def model_and_pairs(args):
    """The benchmark model, its tokenizer and `--pairs` pairs of the asked lengths (cut at a word: a few tokens
    short at most)."""
    rows = long_pairs(args.pairs, 2 * max(args.prompt_len, args.completion_len))
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    model, tokenizer = bench_update.build_model(args, texts)
    pairs = bench_update.fit_pairs(rows, tokenizer, prompt_len=args.prompt_len, completion_len=args.completion_len,
                                   count=args.pairs)
    return model, tokenizer, pairs


def step_rayalign(model, tokenizer, pairs: list[dict], args) -> None:
    """Reference pass, then one optimizer step of --pairs pairs in micro-batches, gradient checkpointing on."""
    from rayalign.config_loader import load_config
    from rayalign.data_kind import PAIRS
    from rayalign.encode import collate_with_reference
    from rayalign.engine import DDPEngine
    from rayalign.oracle import encode_pairs
    from rayalign.step import micro_batch_loss

    config = load_config(None, [
        "loss.type=dpo", "optim.lr=1e-6", "optim.warmup_ratio=0", f"train.global_batch_size={args.pairs}",
        f"train.gradient_accumulation_steps={args.pairs // args.micro_batch}", "train.gradient_checkpointing=true",
        f"data.max_prompt_length={args.prompt_len}", f"data.max_completion_length={args.completion_len}"])
    encoded = encode_pairs(pairs, tokenizer, config).items
    pad = tokenizer.pad_token_id
    model.requires_grad_(False)
    columns, _ = bench_update.reference_pass(model, encoded, pad, config, "cpu")
    model.requires_grad_(True)
    model.gradient_checkpointing_enable()
    # the reference pass is done: the one model trains (as TRL's precompute allows), through the engine the
    # Ray Train workers use (DDP's, one process: no wrapper)
    engine = DDPEngine(model.train(), config, total_steps=1)
    for start in range(0, args.pairs, args.micro_batch):
        batch = collate_with_reference(encoded, columns, torch.arange(start, start + args.micro_batch), kind=PAIRS,
                                       pad_token_id=pad)
        engine.backward(micro_batch_loss(engine.module, batch, config).losses.sum() / args.pairs)
    engine.step()


def step_trl(model, tokenizer, pairs: list[dict], args) -> None:
    """TRL's DPOTrainer, one optimizer step: gradient checkpointing (its default), precomputed reference."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir, use_cpu=True, report_to="none", per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.pairs // args.micro_batch, max_steps=1, learning_rate=1e-6, beta=0.1,
            max_length=args.max_length, bf16=False, save_strategy="no", disable_tqdm=True,
            gradient_checkpointing=True, precompute_ref_log_probs=True, precompute_ref_batch_size=args.micro_batch,
            optim="adamw_torch", train_sampling_strategy="sequential")
        DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                   processing_class=tokenizer).train()


def run_child(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, pairs = model_and_pairs(args)
    loaded = peak_rss_gb()
    started = time.perf_counter()
    (step_trl if args.child == "trl" else step_rayalign)(model, tokenizer, pairs, args)
    return {"peak_rss_gb": round(peak_rss_gb(), 3), "after_load_gb": round(loaded, 3),
            "seconds": round(time.perf_counter() - started, 1)}


def spawn(name: str, argv: list[str]) -> dict:
    """One trainer in a fresh process; killed by the kernel (out of memory) comes back as such."""
    proc = subprocess.run([sys.executable, __file__, *argv, "--child", name], capture_output=True, text=True)
    if proc.returncode in (-9, 137):
        return {"out_of_memory": True}
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        result = run_child(args)
        print(json.dumps(result))
        return result
    runs = {name: spawn(name, argv) for name in args.trainers.split(",") if name}
    result = {"arch": args.arch, "pairs": args.pairs, "micro_batch": args.micro_batch,
              "tokens_per_sequence": args.max_length, "threads": args.threads or torch.get_num_threads(),
              "memory_options": "gradient checkpointing, precomputed reference (both); chunked head (rayalign)"}
    for name, run in runs.items():
        prefix = "" if name == "rayalign" else f"{name}_"
        if run.get("out_of_memory"):
            result[name] = "out of memory"
            continue
        result.update({f"{prefix}peak_rss_gb": run["peak_rss_gb"], f"{prefix}after_load_gb": run["after_load_gb"],
                       f"{prefix}seconds": run["seconds"]})
        print(f"{name:9s} peak RSS {run['peak_rss_gb']:7.2f} GB (model loaded: {run['after_load_gb']:.2f} GB), "
              f"step {run['seconds']:.0f} s", flush=True)
    if "peak_rss_gb" in result and "trl_peak_rss_gb" in result:
        result["peak_ratio_vs_trl"] = round(result["peak_rss_gb"] / result["trl_peak_rss_gb"], 3)
    line = json.dumps(result)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)
    return result


if __name__ == "__main__":
    main()
