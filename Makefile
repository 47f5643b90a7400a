# kdfl: make demo | test | bench | check   (every target creates/reuses .venv, installs with constraints.txt)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
BASE = $(VENV)/.kdfl-base
STAMP = $(VENV)/.kdfl-installed
# Where torch comes from. Default: PyTorch's CPU-only wheels (no GPU needed, no CUDA
# packages), falling back to pip's own configuration (a local CPU wheel, a mirror) when that
# index cannot be reached. TORCH_INDEX=pypi takes PyPI's default build (with CUDA on Linux
# x86_64); any other URL, e.g. https://download.pytorch.org/whl/cu126, picks that build.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(TORCH_INDEX),pypi)
TORCH_FROM =
else
TORCH_FROM = --index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple --timeout 15 --retries 1
endif

.PHONY: help venv demo test test-slow bench check clean

help:
	@echo "make demo       set up .venv and run configs/quickstart.toml (digits, FedAvg) + plots"
	@echo "make test       set up .venv and run the test suite (slow tests excluded)"
	@echo "make test-slow  run only the slow end-to-end tests"
	@echo "make bench      run the benchmarks (several minutes each)"
	@echo "make check      ruff + mypy"
	@echo "torch comes from TORCH_INDEX (default: PyTorch's CPU-only wheels); TORCH_INDEX=pypi for PyPI's CUDA build"

# the library alone (what the demo needs: no Flower/Ray, no dev tools)
$(BASE): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned (constraints.txt) and from TORCH_INDEX: the CPU build, not GBs of CUDA wheels
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH_FROM) torch \
		|| $(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $(BASE)

# plus the test, lint and Flower dependencies
$(STAMP): $(BASE)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,flower]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(BASE)
	$(BIN)/kdfl run configs/quickstart.toml --out runs/quickstart --overwrite
	$(BIN)/kdfl report runs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/baselines.py
	$(BIN)/python benchmarks/headline.py
	$(BIN)/python benchmarks/robustness.py
	$(BIN)/python benchmarks/speed.py

check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
