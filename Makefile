# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all install protos demo demo-lifecycle test lint format bench deploy-test clean

all: install

$(STAMP): pyproject.toml constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) protos

protos: $(STAMP)
	$(PY) protos/generate.py --if-stale

demo: install
	$(VENV)/bin/pathways-lite demo

demo-lifecycle: install
	$(VENV)/bin/pathways-lite demo --lifecycle

test: install
	$(PY) tests/ensure_tools.py
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done

# docker-compose.yml for real (root: installs Docker, starts dockerd if none runs); see deploy/.
deploy-test: install
	PY=$(PY) deploy/deploy-test.sh

clean:
	rm -rf build dist *.egg-info pathways_lite/v1 .pytest_cache
