# Two entry points, each self-installing on a fresh machine (Python >= 3.11, pip; no GPU, no model hub):
#   make demo   - the main job: a GRPO run on a tiny Qwen2.5-VL and built-in synthetic REC data (CPU, minutes)
#   make test   - the whole test suite (what CI runs)
#   make lint   - ruff (lint + format check) and mypy (what CI runs before the tests)
#   make test-scale - streaming conversion of a full-size random 3B with peak-memory checks (not in CI: ~40 GB of
#                     disk, a few minutes; see scripts/test_scale.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint test-scale install install-test install-lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.core

$(VENV)/.lint: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[lint]"
	touch $@ $(VENV)/.core

install: $(VENV)/.core
install-test: $(VENV)/.test
install-lint: $(VENV)/.lint

demo: $(VENV)/.core
	$(BIN)/vlmr1 demo $(DEMO_ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# mypy checks against the installed packages (jax, flax, numpy stubs), so it runs in the same venv.
lint: $(VENV)/.lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-scale: $(VENV)/.core
	$(BIN)/python scripts/test_scale.py $(SCALE_ARGS)

clean:
	rm -rf $(VENV) .jax_cache runs .pytest_cache .mypy_cache .ruff_cache
