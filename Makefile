# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install trtopt, compile ResNet-18 and print a comparison table
#   make test   create .venv, install trtopt with test tools, run the test suite
# (make test-fast runs the fast tier: every test not marked slow; make lint runs ruff and make typecheck runs mypy,
# both configured in pyproject.toml; CI runs them before the tests and fails on any finding.)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for make test / test-fast: each test file runs on one worker (tests/conftest.py).
# 2 matches a 2-core machine; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
# torch and torchvision are pinned as a pair (a mismatched torchvision fails to import).
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

.PHONY: install demo lint typecheck test test-fast test-gpu
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) benchmarks/demo.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .

typecheck: $(VENV)/.installed
	$(PY) -m mypy

test: $(VENV)/.installed
	$(PYTEST)

test-fast: $(VENV)/.installed
	$(PYTEST) -m "not slow"

test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu
