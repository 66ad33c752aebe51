# armodal: `make demo` trains the default experiment; `make test` runs the test suite.
# Both create the virtual environment (.venv) and install everything on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.armodal-installed

.PHONY: setup system-deps demo test test-all bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[all,test]"
	@touch $(STAMP)

setup: $(STAMP) system-deps

system-deps:
	@bash scripts/install_system_deps.sh

demo: setup
	$(VENV)/bin/armodal-train

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PIP) install -q -e ".[bench]"
	$(PY) scripts/bench_generate.py
	$(PY) scripts/bench_train.py

clean:
	rm -rf $(VENV) runs data_cache
