# Front door: `make test` (everything CI runs) and `make bench`.
# Each target creates .venv and installs what it needs when missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TEST_STAMP := $(VENV)/.installed-test

.PHONY: test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

bench: $(TEST_STAMP)
	$(PY) benchmarks/kernels.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
