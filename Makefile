# Two commands for newcomers: `make run` and `make test`. Each bootstraps .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install run test lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## Create or update .venv

run: install ## A short federated simulation on SQLite, then a run summary
	$(BIN)/fedpneumo run $(ARGS)

test: install lint ## The whole suite (ruff, then pytest)
	$(BIN)/python -m pytest $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install ## All benchmarks; figures go to BENCHMARKS.md
	$(BIN)/fedpneumo bench all $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
