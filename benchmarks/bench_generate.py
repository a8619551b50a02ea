"""Samples per second of generation through Ray Data (`Generator` actors) against a bare in-process loop.

Both run the same sampler (`generate.backend`, HF by default: `rayalign.hf_sampling`) on the same model,
prompts and settings, with the same thread count (a Ray actor with `generate.cpus_per_actor=1` gets
OMP_NUM_THREADS=1, so the bare loop uses `--threads`, default that). The bare loop calls `sampler.sample` on
batches of `generate.batch_size` prompts; the Ray path is `rayalign.generate.generation_dataset(...)
.to_pandas()`, the loop's own pass. Runs alternate (bare, Ray, bare, Ray, ...) `--repeats` times; medians
and spreads are printed.

Reported: `ray_overhead` = 1 - Ray samples/s over bare samples/s, end to end (the actor's start-up, model
loading included) and in steady state (`ray_overhead_steady`: the pass minus its actor's start-up, as the
actor reports it in `actor_start_seconds`); the bare loop's model load is timed apart and left out.
`pool_overhead`: the same for a pass through `generate.persistent=true`'s `GeneratorPool` (sampler hosts
started once before the rounds, which sample each pass's blocks on their own, running ahead of the pass's light
Ray Data takers), which is what `rayalign run` pays per pass after its first when the generators persist; so one
whole pass runs untimed before the rounds, as a run's first pass does (it starts the worker processes of the
pass's tasks, which later passes find warm). Each timed pass follows `--settle` seconds of rest, so that the
previous pass's tear-down (a per-pass actor exiting) does not run inside it. The model is the tiny one
(`rayalign.tiny`, built here) unless `--model` names another. The last line is one JSON object. It asserts no
speed: the goal (overhead <= 10%) is read, not tested.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout where rayalign is not installed
    sys.path.insert(0, str(REPO))


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="HF model path or id (default: build the tiny model)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16, help="prompts per sampler call (generate.batch_size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the bare loop (= the actor's CPUs)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds of rest before each timed pass, so one pass's tear-down does not run in the next")
    p.add_argument("--out", default="", help="also write the JSON result here")
    return p.parse_args(argv)


def _settings(args):
    from rayalign.config import GenerateConfig

    return GenerateConfig(backend="hf", num_samples=args.num_samples, temperature=0.7, top_p=0.9,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, num_actors=1,
                          cpus_per_actor=args.threads)


def _prompts(count: int) -> list[str]:
    from rayalign.tasks.sentiment import make_prompts

    return make_prompts(count, seed=101)


def bare_pass(model: str, settings, prompts: list[str]) -> tuple[float, float, int]:
    """(model load seconds, sampling seconds, samples) of the sampler called in this process."""
    from rayalign.samplers import build_sampler

    started = time.perf_counter()
    sampler = build_sampler(settings.backend, model, settings)
    loaded = time.perf_counter()
    samples = 0
    for start in range(0, len(prompts), settings.batch_size):
        chunk = prompts[start:start + settings.batch_size]
        samples += sum(len(s) for s in sampler.sample(chunk, list(range(start, start + len(chunk)))))
    return loaded - started, time.perf_counter() - loaded, samples


def _prompt_frame(prompts: list[str]):
    """The prompts as a generation pass reads them (prompt ids 0..n-1: the per-prompt sampling seeds)."""
    import pandas as pd

    return pd.DataFrame({"prompt_id": range(len(prompts)), "prompt": prompts})


def ray_pass(model: str, settings, prompts: list[str]) -> tuple[float, float, int]:
    """(pass wall seconds, the actor's start-up seconds, samples) of the loop's Ray Data generation pass."""
    from rayalign.generate import generation_dataset
    from rayalign.stage_timing import ACTOR_START

    frame = _prompt_frame(prompts)
    started = time.perf_counter()
    rows = generation_dataset(frame, model, settings).to_pandas()
    wall = time.perf_counter() - started
    return wall, float(rows[ACTOR_START].sum()), int(sum(len(t) for t in rows["texts"]))


def pool_pass(pool, model: str, prompts: list[str]) -> tuple[float, int]:
    """(pass wall seconds, samples) of one pass through the persistent pool (its host already started)."""
    frame = _prompt_frame(prompts)
    started = time.perf_counter()
    rows = pool.dataset(frame, model=model, tag=model).to_pandas()
    return time.perf_counter() - started, int(sum(len(t) for t in rows["texts"]))


def _spread(values: list[float]) -> list[float]:
    return [round(min(values), 2), round(max(values), 2)]


def _start_ray(threads: int) -> None:
    """A local Ray sized to `threads`; a cluster named in RAY_ADDRESS is joined as it is. As `rayalign run` starts
    it: no job-level runtime_env (with one, Ray starts every actor in a fresh worker process set up for it, which
    cost each pass's Ray Data actor ~0.25 s more CPU here); a local Ray gets `rayalign.ray_session.local_start_env`
    and its workers inherit this environment."""
    import ray

    from rayalign.ray_session import local_start_env

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    local = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": max(2, threads), "include_dashboard": False}
    if local:
        local_start_env(local["num_cpus"])
    ray.init(log_to_driver=False, **local)


def run_rounds(args, model: str, settings, prompts: list[str], pool) -> dict[str, list[float]]:
    """`--repeats` rounds of bare, per-pass Ray Data and persistent-pool passes, each after `--settle` s of rest."""
    rounds = {name: [] for name in ("bare", "ray", "steady", "pool", "starts", "loads")}
    for repeat in range(args.repeats):
        time.sleep(args.settle)
        load, seconds, samples = bare_pass(model, settings, prompts)
        time.sleep(args.settle)
        wall, start, ray_samples = ray_pass(model, settings, prompts)
        time.sleep(args.settle)
        pool_wall, pool_samples = pool_pass(pool, model, prompts)
        for name, value in (("bare", samples / seconds), ("ray", ray_samples / wall),
                            ("steady", ray_samples / max(1e-9, wall - start)), ("pool", pool_samples / pool_wall),
                            ("starts", start), ("loads", load)):
            rounds[name].append(value)
        print(f"repeat {repeat + 1}: bare {rounds['bare'][-1]:.1f} samples/s (model load {load:.1f} s apart); Ray "
              f"Data {rounds['ray'][-1]:.1f} end to end, {rounds['steady'][-1]:.1f} without the actor's start-up "
              f"({start:.1f} s); persistent pool {rounds['pool'][-1]:.1f}", flush=True)
    return rounds


def summarize(args, rounds: dict[str, list[float]], pool_start: float) -> dict:
    """The JSON result: medians, overheads against the bare loop, spreads and the settings."""
    median = {name: statistics.median(values) for name, values in rounds.items()}
    return {"bare_samples_per_s": round(median["bare"], 2), "ray_samples_per_s": round(median["ray"], 2),
            "ray_steady_samples_per_s": round(median["steady"], 2),
            "ray_overhead": round(1 - median["ray"] / median["bare"], 3),
            "ray_overhead_steady": round(1 - median["steady"] / median["bare"], 3),
            "pool_samples_per_s": round(median["pool"], 2),
            "pool_overhead": round(1 - median["pool"] / median["bare"], 3),
            "pool_start_s": round(pool_start, 2), "actor_start_s": round(median["starts"], 2),
            "bare_model_load_s": round(median["loads"], 2),
            "spread": {"bare": _spread(rounds["bare"]), "ray": _spread(rounds["ray"]),
                       "ray_steady": _spread(rounds["steady"]), "pool": _spread(rounds["pool"])},
            "threads": args.threads, "prompts": args.prompts, "num_samples": args.num_samples,
            "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "repeats": args.repeats,
            "model": args.model or "tiny"}


def main(argv=None) -> dict:
    args = _args(argv)
    import ray
    import torch

    torch.set_num_threads(args.threads)
    settings, prompts = _settings(args), _prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            from rayalign.tiny import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny"))
        _start_ray(args.threads)
        from rayalign.generator_pool import GeneratorPool

        pool = GeneratorPool(settings, log=lambda message: None)
        pool_start = time.perf_counter()
        pool_pass(pool, model, prompts[:settings.batch_size])  # starts the host: once per run, not per pass
        pool_start = time.perf_counter() - pool_start
        # One whole untimed pass, as a run's first: it also starts the worker processes of the pass's light tasks
        # (one per task in flight; the one-block pass above needed one), which later passes find warm.
        pool_pass(pool, model, prompts)
        rounds = run_rounds(args, model, settings, prompts, pool)
        pool.shutdown()
        ray.shutdown()
    result = summarize(args, rounds, pool_start)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
