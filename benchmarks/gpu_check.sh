#!/usr/bin/env bash
# One command on a GPU machine (torch + transformers are enough; a few minutes on an H100/H200): the gpu tests,
# the update's MFU on the Qwen2.5-0.5B shape, peak GPU memory and HF generation speed; the last line is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# No network there: pytest (for the gpu tests) comes from a wheels folder carried along if it is missing, made
# beforehand with `pip download pytest -d .wheels` on a machine with the same Python (the device's: 3.12).
if ! python -c "import pytest" 2>/dev/null && [ -d .wheels ]; then
  python -m pip install --quiet --no-index --find-links .wheels pytest || echo "gpu_check: pytest not installed"
fi
exec timeout 480 python benchmarks/gpu_check.py
