# Two commands for a new user: `make demo` (set up + federated demo) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU build by default; on a CUDA machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo lint test test-fast bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --constraint constraints.txt torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install --constraint constraints.txt --editable '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/simulate.py experiment=demo

# Quality gates (seconds): lint, format check, type check and the import layers of the packages.
lint: setup
	$(VENV)/bin/ruff check pipeline models transforms
	$(VENV)/bin/ruff format --check pipeline models transforms
	$(VENV)/bin/mypy pipeline models transforms
	$(VENV)/bin/lint-imports --no-logo --no-cache

test: setup lint
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow and not deployment"

bench: setup
	$(PY) scripts/bench/train_loop.py

clean:
	rm -rf outputs
