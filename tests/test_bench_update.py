"""Smoke test of benchmarks/bench_update.py: it runs end to end at a tiny size and ends with its JSON line.

A ~1.3M-parameter model, 1 warm-up + 2 timed steps of 2 pairs, a small matmul for the peak, TRL's default
and fastest variants, 2 interleaved rounds. It asserts no speed (this machine is shared and 2-core): only
that every headline key is present, finite and positive, TRL's included (TRL is a dev dependency), that
the spreads are ordered, and that --out writes the same JSON.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KEYS = ("tokens_per_s", "trl_fastest_tokens_per_s", "ratio_vs_trl_fastest", "trl_default_tokens_per_s",
        "ratio_vs_trl_default", "model_flops_per_s", "matmul_peak_flops_per_s",
        "fraction_of_peak")
TINY = ["--layers", "4", "--hidden", "128", "--heads", "4", "--vocab-size", "1024", "--steps", "2",
        "--warmup-steps", "1", "--batch-size", "2", "--max-length", "64", "--matmul-size", "512",
        "--trl-variants", "default,no_gc_precompute", "--repeats", "2"]


def test_bench_update_tiny_run_prints_positive_finite_json(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_update.py"), *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in KEYS:
        value = result[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (key, value)
    assert result["device"] == "cpu" and result["params"] < 2_000_000 and result["repeats"] == 2
    for name, (low, high) in result["spread"].items():  # min and max over the interleaved rounds
        assert 0 < low <= high, (name, low, high)
    assert set(result["spread"]) >= {"rayalign default", "rayalign padded", "trl default", "trl no_gc_precompute"}
    assert json.loads(out.read_text()) == result
