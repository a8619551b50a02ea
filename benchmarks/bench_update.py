"""Throughput of one DPO policy update: rayalign's training step against TRL 1.16's `DPOTrainer`.

One process, one model (a Llama config or `--arch`'s real shape, random weights, BPE tokenizer trained on the
data), one data set (HH pairs from ../shared, else synthetic pairs of varying length), the same settings (batch,
lengths, dtype, beta, AdamW, one worker): each trainer runs `--warmup-steps` untimed, then `--steps` timed steps
over the same batches in the same order. Tokens = real (non-pad) prompt+completion tokens of chosen and
rejected. Model FLOPs = 6 x params x trained tokens + 2 x params x reference-forward tokens actually run, params
without the input embedding table (a lookup; tied to the head, it counts once, as the head). rayalign's one-off
reference pass is timed and amortised over its pairs.

It prints where the time goes (step phases, padding, the reference pass, the default packed rows vs padded,
a profiler split of one forward+backward, AdamW against a fused one), timed by the wall clock and the process
CPU clock (equal on an idle machine with one thread; on a shared one the CPU clock leaves out time spent
descheduled). The last line is one JSON object, by `--clock`. `--device cuda` measures MFU on a GPU (a bf16 run's
step: bf16 autocast over float32 master weights and AdamW state, as `train.precision=bf16`; the real-shape
Qwen2.5-0.5B model with random weights from `rayalign.arch`; against the bf16 matmul peak) and skips TRL;
trl/datasets are imported only when TRL runs. It checks no numerics (tests/test_trl_reference.py does) and
asserts no speed: the targets are read, not tested. The pairs, the model and the FLOP count are in
update_inputs.py; the summaries and the printout in update_report.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for path in (str(REPO), str(BENCHMARKS)):
    if path not in sys.path:  # run as a plain script from a checkout where rayalign is not installed
        sys.path.insert(0, path)

# Re-exported: bench_memory.py takes build_model and fit_pairs from here.
from update_inputs import TRL_VARIANTS, build_model, fit_pairs, flops_per_token, load_pairs, pair_tokens  # noqa: E402
from update_report import median_rounds, print_report  # noqa: E402

# CPU: the whole run (4 trainers x 6 steps) takes ~4-5 minutes here with a ~25M model and <= 128 tokens.
# One intra-op thread: a Ray Train CPU worker gets 1 CPU, and Ray sets OMP_NUM_THREADS=1 in it.
DEFAULTS = {
    "cpu": dict(arch="none", layers=8, hidden=384, heads=12, vocab_size=8192, batch_size=8, max_length=128, steps=5,
                warmup_steps=1, matmul_size=4096, threads=1, trl_variants="default,no_gc_precompute", clock="cpu",
                repeats=3),
    "cuda": dict(arch="qwen2.5-0.5b", layers=30, hidden=1024, heads=16, vocab_size=8192, batch_size=16,
                 max_length=512, steps=10, warmup_steps=3, matmul_size=8192, threads=0, trl_variants="", clock="wall",
                 repeats=1),
}
GROUPS = (("GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
          ("attention", ("attention", "scaled_dot_product")), ("log-softmax head", ("log_softmax", "gather")))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    for name in ("steps", "warmup-steps", "batch-size", "max-length", "layers", "hidden", "heads", "vocab-size",
                 "matmul-size", "threads", "repeats"):
        p.add_argument(f"--{name}", type=int, default=None, help="default depends on --device; threads 0: torch's")
    p.add_argument("--arch", default=None, help="a real architecture's shape (rayalign.arch: qwen2.5-0.5b, "
                   "llama-3-8b) or 'none' for the Llama config of --layers/--hidden/--heads")
    p.add_argument("--trl-variants", default=None, help=f"comma list of {', '.join(TRL_VARIANTS)}; '' skips TRL")
    p.add_argument("--clock", choices=("wall", "cpu"), default=None,
                   help="clock of the headline (default: cpu on CPU, a shared machine here; wall on cuda)")
    p.add_argument("--out", default=None, help="also write the JSON result to this path")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    from rayalign.arch import ARCHS

    if args.arch not in ("none", *ARCHS):
        p.error(f"--arch must be one of none, {', '.join(ARCHS)}")
    if args.hidden % args.heads or args.steps < 1 or args.warmup_steps < 1 or args.repeats < 1:
        p.error("--hidden must be a multiple of --heads; --steps, --warmup-steps and --repeats must be >= 1")
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu measures one busy thread: it needs --device cpu --threads 1")
    return args


def tick(device: str) -> tuple[float, float]:
    """(wall, process CPU) clock readings, after the device has finished its queued work."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float], device: str) -> tuple[float, float]:
    now = tick(device)
    return now[0] - start[0], now[1] - start[1]


def matmul_peak(device: str, size: int, repeats: int = 5) -> tuple[float, float]:
    """Best-of-`repeats` FLOP/s of one square `torch.mm` (fp32 on CPU, bf16 on CUDA), by (wall, CPU) clock."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up: kernel choice, caches
    best = [math.inf, math.inf]
    for _ in range(repeats):
        start = tick(device)
        torch.mm(a, b)
        best = [min(x, y) for x, y in zip(best, since(start, device))]
    return 2 * size**3 / best[0], 2 * size**3 / max(best[1], 1e-9)


def reference_pass(reference, encoded: list[dict], pad: int, config, device: str) -> tuple[dict, dict]:
    """`rayalign.oracle.reference_columns` (chunks of 16, `reference_scores`), with batches moved to `device` and
    under the step's autocast (bf16 on a GPU, as a bf16 run's reference pass; off on the CPU)."""
    from rayalign.batching import collate_pairs
    from rayalign.devices import training_autocast
    from rayalign.step import reference_scores

    start, parts, positions = tick(device), {}, 0
    for i in range(0, len(encoded), 16):
        batch = {k: v.to(device) for k, v in collate_pairs(encoded[i:i + 16], pad_token_id=pad).items()}
        positions += 2 * batch["chosen_input_ids"].numel()
        with training_autocast(config.train, torch.device(device).type):
            scores = reference_scores(reference, batch, config, want_entropy=False)
        for key, value in scores.items():
            parts.setdefault(key, []).append(value.cpu())
    tokens = sum(map(pair_tokens, encoded))
    return {k: torch.cat(v) for k, v in parts.items()}, {
        "seconds": since(start, device), "tokens": tokens,
        "positions": tokens if config.packs_rows else positions}


def timed_step(policy, batch: dict, config, optimizer, scheduler, device: str) -> dict[str, tuple]:
    """One optimizer step as `rayalign.oracle.train_pairs` runs it (one micro-batch), timed per phase."""
    from rayalign.devices import training_autocast
    from rayalign.objective import pair_metrics
    from rayalign.step import micro_batch_loss

    phases, start = {}, tick(device)
    with training_autocast(config.train, torch.device(device).type):
        out = micro_batch_loss(policy, batch, config)
    phases["forward"], start = since(start, device), tick(device)
    (out.losses.sum() / out.losses.numel()).backward()
    phases["backward"], start = since(start, device), tick(device)
    float(torch.nn.utils.clip_grad_norm_(policy.parameters(), config.optim.max_grad_norm or float("inf")))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    phases["optimizer"], start = since(start, device), tick(device)
    # .cpu(): pair_metric_sums stacks a CPU count with the sums, which fails for CUDA tensors.
    pair_metrics(*(t.detach().cpu() for t in (out.losses, out.policy_chosen_logps, out.policy_rejected_logps,
                                              out.ref_chosen_logps, out.ref_rejected_logps)), beta=config.loss.beta)
    phases["metrics"] = since(start, device)
    return phases


def run_rayalign(model, tokenizer, rows: list[dict], args, *, padding_free: bool | None) -> dict:
    """Reference pass once, then warm-up + timed steps over consecutive batches of `rows`; `padding_free`
    None: the default (`Config.packs_rows`: packed rows for DPO)."""
    from rayalign.config_loader import load_config
    from rayalign.data_kind import PAIRS
    from rayalign.encode import collate_with_reference
    from rayalign.optim import build_optimizer, build_scheduler
    from rayalign.oracle import encode_pairs

    prompt_len, device, size = args.max_length // 2, args.device, args.batch_size
    config = load_config(None, [
        "loss.type=dpo", "loss.beta=0.1", "optim.lr=1e-6", f"train.global_batch_size={size}",
        # a GPU trains as a bf16 run does: autocast over float32 master weights (the CPU: float32 throughout)
        f"train.precision={'bf16' if device == 'cuda' else 'fp32'}",
        *([f"train.padding_free={padding_free}"] if padding_free is not None else []),
        f"data.max_prompt_length={prompt_len}",
        f"data.max_completion_length={args.max_length - prompt_len}"])
    encoded = encode_pairs(rows, tokenizer, config)
    if encoded.prompts_truncated or encoded.completions_truncated:
        raise RuntimeError("rayalign truncated pairs that fit_pairs should have fitted")
    pad = tokenizer.pad_token_id
    columns, ref = reference_pass(model, encoded.items, pad, config, device)
    policy = copy.deepcopy(model).train()  # a fresh copy per trainer: no run sees another's updates
    optimizer = build_optimizer(policy.parameters(), config.optim)
    scheduler = build_scheduler(optimizer, config.optim, args.warmup_steps + args.steps)
    steps = []
    for step in range(args.warmup_steps + args.steps):
        start = tick(device)
        index = torch.arange(step * size, (step + 1) * size)
        batch = collate_with_reference(encoded.items, columns, index, kind=PAIRS, pad_token_id=pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        phases = {"collate": since(start, device), **timed_step(policy, batch, config, optimizer, scheduler, device)}
        real = sum(pair_tokens(encoded.items[i]) for i in index.tolist())
        steps.append({"seconds": since(start, device), "tokens": real, "phases": phases,
                      "positions": real if config.packs_rows else 2 * batch["chosen_input_ids"].numel()})
    return {"steps": steps[args.warmup_steps:], "ref": ref, "profile": profile_step(policy, batch, config, device),
            "adamw": adamw_seconds(policy, optimizer, device)}


def profile_step(policy, batch: dict, config, device: str) -> dict:
    """One forward+backward under the profiler: wall seconds per op group (self time), outside ops, log-softmaxes."""
    from torch.profiler import ProfilerActivity, profile

    from rayalign.devices import training_autocast
    from rayalign.step import micro_batch_loss

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        start = tick(device)
        with training_autocast(config.train, torch.device(device).type):  # as the timed step runs
            losses = micro_batch_loss(policy, batch, config).losses
        losses.mean().backward()
        wall = since(start, device)[0]
    policy.zero_grad(set_to_none=True)
    seconds, log_softmax_calls = dict.fromkeys([name for name, _ in GROUPS] + ["other ops"], 0.0), 0
    for event in prof.key_averages():
        if device == "cuda" and "CPU" not in str(event.device_type):
            continue  # kernel rows repeat the device time their CPU op already reports
        spent = (event.self_device_time_total if device == "cuda" else event.self_cpu_time_total) / 1e6
        seconds[next((name for name, keys in GROUPS if any(k in event.key for k in keys)), "other ops")] += spent
        log_softmax_calls += event.count if event.key == "aten::_log_softmax" else 0
    # CPU: Python and dispatcher time. CUDA: time the GPU sat idle waiting for the host.
    seconds["outside ops"] = max(0.0, wall - sum(seconds.values()))
    return {"seconds": seconds, "wall": wall, "log_softmax_calls": log_softmax_calls}


def adamw_seconds(policy, optimizer, device: str, repeats: int = 3) -> dict[str, tuple]:
    """(wall, CPU) seconds per `step()` of rayalign's AdamW (torch's default implementation) and `fused=True`."""
    params = [p for p in policy.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    out = {}
    for name, opt in (("rayalign AdamW", optimizer), ("AdamW(fused=True)", torch.optim.AdamW(params, fused=True))):
        opt.step()
        start = tick(device)
        for _ in range(repeats):
            opt.step()
        out[name] = tuple(t / repeats for t in since(start, device))
    return out


def run_trl(model, tokenizer, rows: list[dict], args, variant: str) -> dict:
    """TRL's `DPOTrainer` with its defaults (plus `TRL_VARIANTS[variant]`), timed from step end to step end."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ends, counts = [], []  # clocks at each step end; (real tokens, positions) per batch in step order
    precompute = []  # (wall, CPU) seconds of TRL's reference pass (`precompute_ref_log_probs`), in __init__

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            start = tick("cpu")
            out = super()._precompute_ref_logps(*args, **kwargs)
            precompute.append(since(start, "cpu"))
            return out

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(tick("cpu"))

    def counted(batch: dict) -> dict:
        counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    with tempfile.TemporaryDirectory() as out_dir:
        config = DPOConfig(
            output_dir=out_dir, use_cpu=True, report_to="none", per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1, max_steps=args.warmup_steps + args.steps, learning_rate=1e-6,
            beta=0.1, max_length=args.max_length, bf16=False, save_strategy="no", disable_tqdm=True,
            # Not a speed setting: makes TRL's batches the same pairs, in the same order, as rayalign's.
            train_sampling_strategy="sequential", **TRL_VARIANTS[variant])
        trainer = TimedDPOTrainer(model=copy.deepcopy(model), args=config, train_dataset=Dataset.from_list(rows),
                             ref_model=None if config.precompute_ref_log_probs else copy.deepcopy(model),
                             processing_class=tokenizer, callbacks=[StepTimer()])
        collate = trainer.data_collator
        trainer.data_collator = lambda examples: counted(collate(examples))
        trainer.train()
    first = args.warmup_steps
    run = {"steps": [{"seconds": (b[0] - a[0], b[1] - a[1]), "tokens": c[0], "positions": c[1]}
                     for a, b, c in zip(ends[first - 1:], ends[first:], counts[first:])],
           "settings": f"optim={config.optim}, gradient_checkpointing={config.gradient_checkpointing}, "
                       f"precompute_ref_log_probs={config.precompute_ref_log_probs}"}
    if config.precompute_ref_log_probs:  # timed and amortised as rayalign's reference pass is
        if not precompute:
            raise RuntimeError("TRL did not run its reference precompute (a cached result?): its time would be 0")
        run["ref"] = {"seconds": tuple(sum(p[i] for p in precompute) for i in (0, 1))}
        run["settings"] += f"; reference precompute {run['ref']['seconds'][1]:.2f} s (CPU clock), amortised"
    return run


def run_trainers(model, tokenizer, rows: list[dict], args) -> dict:
    """rayalign's defaults (packed rows) and padded, then the TRL variants (CPU only); a trainer that cannot
    run says why."""
    runs = {"rayalign default": run_rayalign(model, tokenizer, rows, args, padding_free=None)}
    try:
        runs["rayalign padded"] = run_rayalign(model, tokenizer, rows, args, padding_free=False)
    except Exception as e:  # keep the headline when the comparison fails
        runs["rayalign padded"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if args.device == "cuda":
        runs["trl default"] = {"error": "skipped on cuda: TRL runs on CPU only here (the GPU machine has no trl)"}
    for variant in [v for v in args.trl_variants.split(",") if v] if args.device == "cpu" else []:
        try:
            runs[f"trl {variant}"] = run_trl(model, tokenizer, rows, args, variant)
        except ImportError as e:
            runs[f"trl {variant}"] = {"error": f"TRL not importable: {e}"}
    return runs


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_pairs, load_before = args.batch_size * (args.warmup_steps + args.steps), os.getloadavg()[0]
    raw, source = load_pairs(n_pairs)
    model, tokenizer = build_model(args, [r[k] for r in raw[:4000] for k in ("prompt", "chosen", "rejected")])
    rows = fit_pairs(raw, tokenizer, prompt_len=args.max_length // 2,
                     completion_len=args.max_length - args.max_length // 2, count=n_pairs)
    n_params = sum(p.numel() for p in model.parameters())
    # The input embedding is a lookup, not a matmul; tied to the head, the one tensor is the head's matmul.
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    matmul_params = n_params - (0 if tied else model.get_input_embeddings().weight.numel())
    clock = ("wall", "cpu").index(args.clock)
    flops = flops_per_token(model, matmul_params, rows, tokenizer)
    peaks = [matmul_peak(args.device, args.matmul_size)[clock]]  # again at the end: the machine may be shared
    # Interleaved: every round runs each trainer once (rayalign, then the TRL variants), so a slow spell of
    # the shared machine hits all of them rather than one; the medians over rounds are compared.
    rounds = [run_trainers(model, tokenizer, rows, args) for _ in range(args.repeats)]
    peaks.append(matmul_peak(args.device, args.matmul_size)[clock])
    peak, amortise = max(peaks), args.steps / (args.steps + args.warmup_steps)
    rows_out = median_rounds(rounds, flops, amortise, clock)
    info = {"device": args.device, "torch threads (every run)": torch.get_num_threads(), "clock": args.clock,
            "data": source, "pairs": n_pairs, "params": n_params, "matmul params": matmul_params,
            "batch (pairs)": args.batch_size, "repeats (interleaved)": args.repeats,
            "model": (f"{args.arch} (random weights), tokenizer vocab {len(tokenizer)}" if args.arch != "none" else
                      f"Llama {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {len(tokenizer)}"),
            "max length": args.max_length, "steps (warm-up + timed)": f"{args.warmup_steps} + {args.steps}",
            "model GFLOP per token (trained / reference forward, attention included)":
                f"{flops[0] / 1e9:.3f} / {flops[1] / 1e9:.3f}",
            "matmul peak GFLOP/s (start / end)": " / ".join(f"{p / 1e9:.1f}" for p in peaks),
            "load average before/after": f"{load_before:.2f} / {os.getloadavg()[0]:.2f}"}
    print_report(rounds[-1], rows_out, peak, info, clock)
    ours = rows_out["rayalign default"]
    fastest, default = rows_out.get("trl no_gc_precompute"), rows_out.get("trl default")

    def rate(row):
        return row and row["tokens_per_s"]

    result = {"tokens_per_s": ours["tokens_per_s"], "trl_fastest_tokens_per_s": rate(fastest),
              "ratio_vs_trl_fastest": fastest and ours["tokens_per_s"] / fastest["tokens_per_s"],
              "trl_default_tokens_per_s": rate(default),
              "ratio_vs_trl_default": default and ours["tokens_per_s"] / default["tokens_per_s"],
              "model_flops_per_s": ours["model_flops_per_s"], "matmul_peak_flops_per_s": peak,
              "fraction_of_peak": ours["model_flops_per_s"] / peak, "device": args.device, "clock": args.clock,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "params": n_params,
              "spread": {k: r["spread"] for k, r in rows_out.items()}} | {
        f"{k.replace(' ', '_')}_tokens_per_s": r["tokens_per_s"] for k, r in rows_out.items()}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
