# `make run` and `make test` create .venv from setup.cfg on first use (only Python is needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint format

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/saferlhf $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check saferlhf tests experiments
	$(BIN)/ruff format --check saferlhf tests experiments

format: $(BIN)/.installed
	$(BIN)/ruff check --fix saferlhf tests experiments
	$(BIN)/ruff format saferlhf tests experiments

# The whole suite, slow end-to-end tests included (this is what CI runs), on two pytest workers:
# every test runs torch on one thread, so two share two cores; each file stays on one worker,
# so its module fixtures are built once.
test: lint
	$(BIN)/python -m pytest -n 2 --dist worksteal

# The quick loop: everything but the tests marked slow.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not slow"
