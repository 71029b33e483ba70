# Two commands for a new user: `make demo` (set up + federated demo) and `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# CPU build by default; on a CUDA machine: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: setup demo lint test test-fast bench clean docker-base docker-test chaos

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

# Two workers, each taking whole test files (a file's tests share their fixtures and ports).
test: setup lint
	$(PY) -m pytest -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -m "not slow and not deployment"

# The image built and the compose federation run (needs a docker daemon: docs/deployment.md#docker).
# BASE_IMAGE is made offline with mmdebstrap when absent; this machine's pip CA bundle and
# find-links folder are passed to the image build.
BASE_IMAGE ?= fedrad-base:bookworm
CA_BUNDLE  ?= $(or $(PIP_CERT),$(shell $(PIP) config get global.cert 2>/dev/null))
WHEELHOUSE ?= $(or $(PIP_FIND_LINKS),$(shell $(PIP) config get global.find-links 2>/dev/null))
docker-base:
	docker image inspect $(BASE_IMAGE) >/dev/null 2>&1 || { \
	  mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm /tmp/fedrad-base.tar \
	  && docker import /tmp/fedrad-base.tar $(BASE_IMAGE) && rm -f /tmp/fedrad-base.tar; }

docker-test: setup docker-base
	FEDRAD_BASE_IMAGE=$(BASE_IMAGE) CA_BUNDLE=$(CA_BUNDLE) WHEELHOUSE=$(WHEELHOUSE) TORCH_INDEX= PIP_FIND_LINKS= \
	  $(PY) -m pytest -m docker -s

# Faults injected into a loaded three-site deployment (about an hour on 2 cores).
chaos: setup
	$(PY) -m pytest -m chaos -s

bench: setup
	$(PY) scripts/bench/train_loop.py

clean:
	rm -rf outputs
