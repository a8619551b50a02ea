"""bench_update.py's report: each trainer's throughput, the median over the interleaved rounds, the printout.

It turns the timed runs (steps, tokens, positions, (wall, CPU) seconds) into tokens/s, pad fraction and model
FLOP/s, and prints the table and where the time went. It runs and times nothing (bench_update.py does) and
writes no JSON.
"""

from __future__ import annotations

from update_inputs import TRL_VARIANTS

PHASES = ("collate", "forward", "backward", "optimizer", "metrics")


def summarize(run: dict, name: str, flops_per_token: tuple[float, float], amortise: float, clock: int) -> dict:
    """Throughput of one trainer by clock `clock` (0 wall, 1 CPU), adding `amortise` x its one-off reference pass
    (rayalign's, or TRL's precompute).
    `flops_per_token`: (trained, reference forward) model FLOPs per real token, attention included."""
    tokens = sum(s["tokens"] for s in run["steps"])
    seconds = [sum(s["seconds"][i] for s in run["steps"]) for i in (0, 1)]
    ref = run["ref"]["seconds"] if "ref" in run else (0.0, 0.0)
    ref_in_flops = "ref" in run or not TRL_VARIANTS[name.removeprefix("trl ")].get("precompute_ref_log_probs")
    rates = [tokens / (seconds[i] + amortise * ref[i]) for i in (0, 1)]
    return {"tokens_per_s": rates[clock], "steps_only_tokens_per_s": tokens / seconds[clock],
            "wall_tokens_per_s": rates[0], "cpu_clock_tokens_per_s": rates[1],
            "pad_fraction": 1 - tokens / sum(s["positions"] for s in run["steps"]),
            "model_flops_per_s": (flops_per_token[0] + ref_in_flops * flops_per_token[1]) * rates[clock]}


def median_rounds(rounds: list[dict], flops: tuple[float, float], amortise: float, clock: int) -> dict:
    """Per trainer: the round with the median tokens/s (its whole summary) and the spread (min, max) over rounds."""
    out = {}
    for name in rounds[0]:
        summaries = sorted((summarize(r[name], name, flops, amortise, clock) for r in rounds if "steps" in r[name]),
                           key=lambda x: x["tokens_per_s"])
        if summaries:
            rates = [x["tokens_per_s"] for x in summaries]
            out[name] = {**summaries[len(summaries) // 2], "spread": [round(rates[0], 2), round(rates[-1], 2)]}
    return out


def print_report(runs: dict, rows: dict, peak: float, info: dict, clock: int) -> None:
    print("\n".join(f"{k}: {v}" for k, v in info.items()))
    print(f"\n{'trainer':<24}{'tok/s':>8}{'steps-only':>12}{'wall':>7}{'cpu-clock':>11}{'pad':>7}{'GFLOP/s':>9}"
          f"{'of peak':>9}")
    for name, r in rows.items():
        print(f"{name:<24}{r['tokens_per_s']:>8.0f}{r['steps_only_tokens_per_s']:>12.0f}{r['wall_tokens_per_s']:>7.0f}"
              f"{r['cpu_clock_tokens_per_s']:>11.0f}{r['pad_fraction']:>7.1%}{r['model_flops_per_s'] / 1e9:>9.1f}"
              f"{r['model_flops_per_s'] / peak:>9.1%}")
    print(f"(tok/s: {info['clock']} clock with rayalign's reference pass amortised, steps-only: without it; wall, "
          "cpu-clock: tok/s by either clock; GFLOP/s, of peak: model FLOPs at tok/s)")
    per_step = {tuple(s["tokens"] for s in run["steps"]) for run in runs.values() if "steps" in run}
    print(f"every trainer saw the same real tokens per step: {len(per_step) == 1}")
    for name, run in runs.items():
        if "error" in run or "settings" in run:
            print(f"{name}: {run.get('settings') or 'not run: ' + run['error']}")
    for name, run in runs.items():
        if "profile" not in run:  # rayalign's runs: the phases and the profile
            continue
        ref, prof, n = run["ref"], run["profile"], len(run["steps"])
        print(f"\n{name}: reference pass once over {info['pairs']} pairs: {ref['seconds'][clock]:.2f} s, "
              f"{ref['tokens']} tokens, {1 - ref['tokens'] / ref['positions']:.1%} pad positions")
        print("  per step (s): " + ", ".join(f"{k} {sum(s['phases'][k][clock] for s in run['steps']) / n:.3f}"
                                            for k in PHASES))
        gemm_flops = 6 * info["matmul params"] * run["steps"][-1]["positions"]
        print(f"  one forward+backward profiled ({prof['wall']:.2f} s wall): " + ", ".join(
            f"{k} {v / prof['wall']:.0%}" for k, v in prof["seconds"].items()) + f"; {prof['log_softmax_calls']} "
            f"full-vocab log_softmax calls; GEMMs ran at {gemm_flops / max(prof['seconds']['GEMM'], 1e-9) / 1e9:.0f}"
            " GFLOP/s (wall)")
        print("  optimizer.step alone (s): " + ", ".join(f"{k} {v[clock]:.3f}" for k, v in run["adamw"].items()))
