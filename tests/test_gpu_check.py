"""The GPU check's test run where the GPU machine has it: no Ray, DeepSpeed or vLLM installed.

`benchmarks/gpu_check.py` runs `pytest -m gpu tests/test_gpu.py` on a machine with only torch and transformers;
the suite's session fixtures (the shared Ray head) must then stand aside. Here a `sitecustomize` hides the three
packages from a pytest subprocess (`sys.modules[name] = None`: their import fails, `find_spec` finds nothing):
a test that needs none of them passes (so every session fixture set up), and the `gpu` test files collect.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO

HIDDEN = ("ray", "deepspeed", "vllm")


def _pytest_without_the_stack(tmp_path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in HIDDEN))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYALIGN_TEST_OWN_RAY")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(REPO)])
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_the_suite_runs_where_ray_deepspeed_and_vllm_are_not_installed(tmp_path):
    check = _pytest_without_the_stack(tmp_path, "-c", "pyproject.toml", "-W", "ignore",
                                      "tests/test_precision.py::test_inference_dtype_auto_is_bf16_on_gpu_and_fp32_on_cpu")
    assert check.returncode == 0 and "1 passed" in check.stdout, check.stdout[-3000:] + check.stderr[-3000:]
    gpu = _pytest_without_the_stack(tmp_path, "-m", "gpu", "tests/test_gpu.py", "tests/test_gpu_stack.py")
    assert gpu.returncode == 0 and "error" not in gpu.stdout.lower(), gpu.stdout[-3000:] + gpu.stderr[-3000:]
