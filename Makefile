# The two commands of README.md: `make demo` and `make test`.
# Both create .venv when it is missing and install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.nndiag-installed
EXTRAS ?= all,dev,bench

.PHONY: demo test setup sysdeps lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned exactly (a CPU build is served locally); then the package.
$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	# the extras include the reference tools for parity tests (bench: weightwatcher, pyhessian,
	# loss-landscapes); repeating the torch pin keeps pip from ever swapping the build.
	$(PIP) install -q -e '.[$(EXTRAS)]' 'torch==2.13.0'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests need (headless Chromium for the report's browser test).
sysdeps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium missing and not root: browser tests will be skipped" >&2; fi; \
	fi

demo: setup
	$(PY) -m nndiag.demo

test: setup sysdeps
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) nndiag-demo .pytest_cache
