# make test    set up .venv if needed, build the extensions, run the test suite
# make report  set up .venv if needed, build, probe this machine, run the benchmark suites,
#              write reports/<host>/index.html, report.md and report.json
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp

.PHONY: test report build clean chromium

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

# The report's page test renders index.html in headless Chromium (Debian's package): installed
# here when missing and this runs as root with apt-get; the test then requires it.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report's page test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	  else echo "chromium missing and not installable here (needs root and apt-get)"; fi; }

test: build chromium
	PYKERNELS_REQUIRE_LUT_BACKENDS=1 PYKERNELS_REQUIRE_CHROMIUM=1 $(PY) -m pytest -q tests

report: build
	$(PY) -m bench.report

clean:
	rm -rf build *.egg-info pykernels/*.so
