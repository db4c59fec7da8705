# Two commands for newcomers: `make run` and `make test`. Each bootstraps .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install run test test-fast lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create or update .venv

run: install ## A short federated simulation on SQLite, then a run summary
	$(BIN)/fedpneumo run $(ARGS)

# Three workers: the e2e tests spend much of their time waiting on processes
# (Flower polls, Ray, PostgreSQL), so they overlap well even on two cores
# (a fourth oversubscribes them: each e2e run starts its own Ray workers).
# Tests are scheduled one by one, except the modules tests/conftest.py keeps
# together (their module-scoped runs are made once, on one worker). One math
# thread per process (inherited by every CLI, Flower and Ray process a test
# starts): several workers with a thread per core each oversubscribe it.
WORKERS ?= 3
test: install lint ## The whole suite (lint, then pytest, e2e included)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n $(WORKERS) --dist loadscope $(ARGS)

test-fast: install ## The unit tier only (no Flower runs)
	$(BIN)/python -m pytest -m "not e2e" $(ARGS)

lint: install ## ruff, the formatter's check and the layer contracts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

DATA ?= ../shared/data/pneumoniamnist.npz
bench: install ## All CPU benchmarks on DATA; figures go to BENCHMARKS.md
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks all --data $(DATA) $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
