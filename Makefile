# `make demo` and `make test` set everything up on a fresh machine (Python 3.10+).
# A GPU user installs the default (CUDA) torch wheel with `make install TORCH=torch`.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench recipes lint clean

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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
