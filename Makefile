# Everything runs from a project-local virtual environment that the targets build themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A CPU-only torch wheel for the parity tests, where the machine provides one locally.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-*+cpu-*.whl))

.PHONY: venv test test-slow lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev,parity]" $(TORCH_WHEEL)
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check src tests

test: lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
