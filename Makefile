# The README's commands. Each target creates .venv when missing and installs torch first from TORCH_SPEC
# (on CPU-only machines: TORCH_SPEC=torch==2.13.0, a local CPU build), then the project.
PYTHON ?= python3
TORCH_SPEC ?= torch
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo
# pytest-xdist workers; one test file stays on one worker (--dist loadfile), so a module's fixtures are built
# once. Much of the suite waits on subprocesses and MLflow servers: on 2 cores the clean-clone CI ran pytest in
# 432 s on 2 workers where one took 659 s. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

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
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
