# ssn_exp: `make run` trains + certifies the default experiment, `make test` runs the tests.
# Both set up the virtual environment (.venv) first. `make help` lists every target.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: help install run test test-fast lint bench sweep-smoke sweep-paper-cifar10 sweep-paper-imagenet sweep-dssn-seeds sweep-denoisers report clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-22s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ssn_exp with its dependencies (editable)

run: $(STAMP)  ## train + certify the default experiment (digits, DSSN); extra Hydra overrides via ARGS="..."
	$(PY) -m ssn_exp $(ARGS)

test: $(STAMP)  ## run the whole test suite (slow tests included)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)  ## run the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow" $(ARGS)

lint: $(STAMP)  ## ruff check + format check
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

clean:  ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache src/*.egg-info multirun
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -prune -exec rm -rf {} +
