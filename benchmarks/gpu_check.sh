#!/usr/bin/env bash
# One command on a GPU machine (torch + transformers are enough; a few minutes on an H100/H200): the gpu tests,
# the update's MFU on the Qwen2.5-0.5B shape, peak GPU memory and HF generation speed; the last line is JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 python benchmarks/gpu_check.py
