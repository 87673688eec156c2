# pneumoscope: `make demo` runs the whole thing locally, `make test` runs the tests.
# Both install what they need into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1
DEMO_PORT ?= 8480

.PHONY: setup demo test test-fast compile bench clean mutation

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	@echo "== pneumoscope demo: the training pipeline on kfp.local with the 'demo' profile"
	@echo "   (96 px, 2 epochs: about 10 minutes on 2 CPU cores; a demonstration, not a clinical model)"
	$(BIN)/pneumoscope pipeline run --local --profile demo
	@echo "== serving the champion on http://127.0.0.1:$(DEMO_PORT) (Ctrl-C stops it)"
	$(BIN)/pneumoscope serve --model models:/pneumonia@champion --port $(DEMO_PORT)

test: setup
	$(BIN)/python -m pytest -q -rs

# Mutation testing of the method's core (a benchmark, not part of `make test`): per-module scores go to
# benchmarks/mutation/*.json and BENCHMARKS.md. CPU-heavy, runs niced; MODULES=dicom export ... picks some.
mutation: setup
	$(BIN)/python benchmarks/mutation.py $(MODULES)

compile: setup
	$(BIN)/pneumoscope pipeline compile

clean:
	rm -rf .pneumoscope local_outputs .pytest_cache
