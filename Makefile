# Set-up is part of every target: `make demo` and `make test` create and fill .venv themselves.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-quick test-slow bench bench-gpu clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Without a GPU take the local CPU wheel first; with one, pip's resolver picks the CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch==2.13.0"; fi
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  # starts afresh: the previous demo's outputs/demo is replaced
	rm -rf outputs/demo
	$(BIN)/ldm demo --output outputs/demo

test: $(STAMP)  # the import layers (pyproject.toml [tool.importlinter]), then everything but the full-size SD models
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)  # the quick loop: the import layers, then the tests not marked slow
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)  # the full-size SD models
	RUN_SLOW=1 $(BIN)/python -m pytest -q -m fullsize

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_cpu.py

bench-gpu: $(STAMP)  # CUDA only: sampling it/s and peak memory (ours vs diffusers, eager vs compiled), training MFU
	$(BIN)/python benchmarks/bench_gpu.py $(ARGS)

clean:
	rm -rf $(VENV) outputs
