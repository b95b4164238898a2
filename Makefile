# make test    set up .venv if needed, build the extensions, run the test suite
# make report  set up .venv if needed, build, probe this machine, run the benchmark suites,
#              write reports/<host>/report.{json,md}
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: test report build clean

# torch: the CPU build 2.13.0 on machines without an NVIDIA GPU (an unpinned torch would pull a
# multi-GB CUDA build); on a GPU machine, the default (CUDA) build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel "pybind11>=2.12"
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PY) -m pip install -q torch; \
	else \
	  $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q --no-build-isolation -e '.[test,report]'
	touch $(STAMP)

# Incremental: rebuilds only what changed since the last build (sources and headers).
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace --parallel 2

test: build
	PYKERNELS_REQUIRE_LUT_BACKENDS=1 $(PY) -m pytest -q tests

report: build
	$(PY) -m bench.report

clean:
	rm -rf build *.egg-info pykernels/*.so
