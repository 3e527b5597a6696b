# The two commands: `make run` (the whole service, locally) and `make test` (everything CI runs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint format migrate bench check-invariants clean

# Creates the virtualenv and installs the project the first time, and again when
# pyproject.toml changes.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,local]'
	touch $(STAMP)

run: $(STAMP) ## start PostgreSQL, Temporal (+UI), the Stripe stand-in, the worker and the API
	$(PY) -m devtools.stack

test: $(STAMP) lint ## lint, types, and the whole test suite
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

migrate: $(STAMP) ## apply migrations to DATABASE_URL
	$(VENV)/bin/alembic upgrade head

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

bench: $(STAMP) ## complete checkouts against the real local stack at concurrency 1, 10, 50
	$(PY) -m devtools.bench

check-invariants: $(STAMP) ## verify the stock ledger's invariants on DATABASE_URL (and Stripe)
	$(PY) -m core.invariants
