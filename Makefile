# Two commands for a fresh machine with Python 3.11: `make up` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= compose/first.local.toml
# Extra arguments for `first up`, e.g. make up ARGS="--port 8080"
ARGS   ?=

.PHONY: up test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed-local: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local,dev]'
	touch $(VENV)/.installed-local $@

up: $(VENV)/.installed-local
	$(BIN)/first up --config $(CONFIG) $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.throughput

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
