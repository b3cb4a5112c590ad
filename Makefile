# Two commands for a fresh machine with Python 3.11: `make up` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= compose/first.local.toml
# Extra arguments for `first up`, e.g. make up ARGS="--port 8080"
ARGS   ?=

.PHONY: up test lint bench bench-requestpath clean

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
	tools/sysdeps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.throughput

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local,dev,bench]'
	touch $(VENV)/.installed-local $(VENV)/.installed-dev $@

# The request path against a zero-delay mock engine, direct vs through the stack; e.g.
# make bench-requestpath BENCH_ARGS="--quick --json /tmp/rp.json --profile /tmp/rp-prof"
bench-requestpath: $(VENV)/.installed-bench
	$(BIN)/python -m bench.requestpath --plot docs/requestpath.png $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
