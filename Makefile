# kdfl: make demo | test | bench | check   (every target creates/reuses .venv, installs with constraints.txt)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
STAMP = $(VENV)/.kdfl-installed

.PHONY: help venv demo test test-slow bench check clean

help:
	@echo "make demo       set up .venv and run configs/quickstart.toml (digits, FedAvg) + plots"
	@echo "make test       set up .venv and run the test suite (slow tests excluded)"
	@echo "make test-slow  run only the slow end-to-end tests"
	@echo "make bench      run the benchmarks (several minutes each)"
	@echo "make check      ruff + mypy"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build instead of multi-GB CUDA wheels
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,flower]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
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
