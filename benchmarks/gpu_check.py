"""The GPU check: the `gpu` tests, then the update's MFU and HF generation speed on one GPU, in one JSON line.

Runs where only torch and transformers are installed (no Ray, DeepSpeed, vLLM, TRL or datasets): the update
is the in-process path the oracle shares with the Ray Train workers (`benchmarks/bench_update.py --device
cuda`: a bf16 run's step, bf16 autocast over float32 master weights and AdamW state, on the Qwen2.5-0.5B shape
with random weights; TRL skipped). Generation is `rayalign.hf_sampling`
on the same shape in bf16. The JSON: `gpu_tests` (passed / failed / skipped), `update_mfu_measured_peak`
(model FLOPs over the best bf16 matmul measured here), `update_mfu_datasheet` (over the GPU's datasheet dense
bf16 peak, when the GPU is one listed below), `update_tokens_per_s` (real tokens), `peak_gpu_memory_gb`,
`generate_tokens_per_s`. Model FLOPs as bench_update counts them: 6 x matmul params per trained token + 2 x
per reference token, plus attention (PaLM's 12 x layers x width x T per trained token, 4 x for a forward).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for path in (str(REPO), str(BENCHMARKS)):
    if path not in sys.path:
        sys.path.insert(0, path)

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), FLOP/s.
DATASHEET_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def gpu_tests() -> dict | str:
    """The `gpu` tests of tests/test_gpu.py, counted; without pytest (the machine may lack it, and
    gpu_check.sh installs it only from a carried wheels folder) the reason instead."""
    import importlib.util
    import os

    if importlib.util.find_spec("pytest") is None:
        return "not run: pytest is not installed (see benchmarks/gpu_check.sh)"
    # RAYALIGN_TEST_OWN_RAY: no shared Ray head for the session (the GPU machine may have no Ray at all)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-p",
                           "no:cacheprovider"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "RAYALIGN_TEST_OWN_RAY": "1"})
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    print(proc.stdout[-3000:], flush=True)
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
            "skipped": counts.get("skipped", 0)}


def generation_tokens_per_s(prompts: int = 64, new_tokens: int = 128) -> float:
    from rayalign.arch import build_arch_model
    from rayalign.hf_sampling import sample_rows

    model = build_arch_model("qwen2.5-0.5b", seed=0, device="cuda").to(torch.bfloat16).eval()
    rows = [[(7 * i + j) % 5000 + 10 for j in range(64)] for i in range(prompts)]
    sample_rows(model, rows[:2], [0, 1], temperature=0.7, top_p=1.0, max_new_tokens=4, eos_token_id=-1,
                pad_token_id=0)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    tokens, _ = sample_rows(model, rows, list(range(prompts)), temperature=0.7, top_p=1.0,
                            max_new_tokens=new_tokens, eos_token_id=-1, pad_token_id=0)
    torch.cuda.synchronize()
    return sum(len(t) for t in tokens) / (time.perf_counter() - started)


def main() -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device")
    import bench_update

    name = torch.cuda.get_device_name()
    result = {"gpu": name, "torch": torch.__version__, "gpu_tests": gpu_tests()}
    torch.cuda.reset_peak_memory_stats()
    update = bench_update.main(["--device", "cuda", "--trl-variants", ""])
    result.update(update_tokens_per_s=update["tokens_per_s"], update_mfu_measured_peak=update["fraction_of_peak"],
                  matmul_peak_tflops=update["matmul_peak_flops_per_s"] / 1e12,
                  peak_gpu_memory_gb=torch.cuda.max_memory_allocated() / 2**30)
    datasheet = next((peak for key, peak in DATASHEET_BF16.items() if key in name), None)
    if datasheet:
        result["update_mfu_datasheet"] = update["model_flops_per_s"] / datasheet
    result["generate_tokens_per_s"] = generation_tokens_per_s()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
