"""Smoke test of benchmarks/bench_memory.py: both trainers run one step at a tiny size and it ends with its JSON.

A 2-layer Llama, 4 pairs of 16 + 16 tokens in micro-batches of 2. It asserts no memory figure (the real
shape is the benchmark's job, not CI's): only that both peaks were measured, are at least the memory the
model took to load, and that --out holds the same JSON.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "none", "--pairs", "4", "--micro-batch", "2", "--prompt-len", "16", "--completion-len", "16",
        "--vocab-size", "600", "--threads", "1"]


def test_bench_memory_tiny_run_prints_both_peaks(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for prefix in ("", "trl_"):
        assert result[f"{prefix}peak_rss_gb"] >= result[f"{prefix}after_load_gb"] > 0, result
    assert result["peak_ratio_vs_trl"] > 0 and result["pairs"] == 4 and result["tokens_per_sequence"] == 32
    assert json.loads(out.read_text()) == result
