"""Smoke test of benchmarks/bench_generate.py: it runs end to end at a tiny size and ends with its JSON line.

The tiny model, 4 prompts x 2 samples x 6 tokens, one repeat. It asserts no speed (this machine is shared
and 2-core): only that the headline keys are present and finite, the rates positive, and --out the same JSON.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

from tests.conftest import own_ray_env

REPO = Path(__file__).resolve().parents[1]
TINY = ["--prompts", "4", "--num-samples", "2", "--max-new-tokens", "6", "--batch-size", "2", "--repeats", "1",
        "--settle", "0"]


def test_bench_generate_tiny_run_prints_finite_json(tmp_path):
    out = tmp_path / "result.json"
    # a Ray of its own, as the benchmark starts it (its CPU count follows --threads): not the suite's shared head
    env = own_ray_env(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("bare_samples_per_s", "ray_samples_per_s", "ray_steady_samples_per_s", "pool_samples_per_s",
                "actor_start_s", "pool_start_s"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, (key, result)
    for key in ("ray_overhead", "ray_overhead_steady", "pool_overhead"):
        assert math.isfinite(result[key]) and result[key] < 1, (key, result)
    assert result["threads"] == 1 and result["prompts"] == 4
    assert json.loads(out.read_text()) == result
