# Two entry points, each self-installing on a fresh machine (Python >= 3.11, pip; no GPU, no model hub):
#   make demo   - the main job: a GRPO run on a tiny Qwen2.5-VL and built-in synthetic REC data (CPU, minutes)
#   make test   - the whole test suite (what CI runs)
#   make lint   - ruff (lint + format check), mypy and the import contracts (lint-imports; docs/architecture.md)
#   make test-fast - the edit loop: the suite without `slow` tests and the modules that train, sample or compile
#                    whole models (under 2 minutes on 2 cores with a warm compile cache; `make test` runs them all)
#   make bench     - ours vs HF generate and TRL's GRPOTrainer on the same random models, plus the machine's limits
#                    (installs the bench extra; each script appends a JSON line to benchmarks/results/; about 30
#                    minutes on 2 cores; e.g. BENCH_CONFIGS=small BENCH_REPEATS=5; docs/benchmarks.md)
#   make test-scale - streaming conversion of a full-size random 3B with peak-memory checks (not in CI: ~40 GB of
#                     disk, a few minutes; see scripts/test_scale.py)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint bench test-scale install install-test install-lint clean

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

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[bench]"
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
	$(BIN)/lint-imports

# Modules (tests/test_<name>.py) left out of test-fast: training runs in child processes, whole-model compiles.
HEAVY_TESTS := parity plan mixed_precision train_step resume lora run_identity multihost rewards_fuzz crash_safety \
	streaming nonfinite signals eval_rec sampler sharding converter_hf train_modes

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" $(HEAVY_TESTS:%=--ignore=tests/test_%.py) $(PYTEST_ARGS)

BENCH_CONFIGS ?= tiny small demo
BENCH_REPEATS ?= 3
bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks.bench_machine
	for config in $(BENCH_CONFIGS); do \
		for script in sampler step scaling; do \
			$(BIN)/python -m benchmarks.bench_$$script --config $$config --repeats $(BENCH_REPEATS) || exit 1; \
		done; \
	done
	$(BIN)/python -m benchmarks.table

test-scale: $(VENV)/.core
	$(BIN)/python scripts/test_scale.py $(SCALE_ARGS)

clean:
	rm -rf $(VENV) .jax_cache runs .pytest_cache .mypy_cache .ruff_cache
