# The README's commands. Each target creates .venv when missing and installs torch first from TORCH_SPEC
# (on CPU-only machines: TORCH_SPEC=torch==2.13.0, a local CPU build), then the project.
PYTHON ?= python3
TORCH_SPEC ?= torch
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: venv demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,server]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	DEMO_DIR=$(DEMO_DIR) bash pipelines/demo.sh

test: venv
	$(BIN)/ruff check medsup tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
