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

.PHONY: help venv demo test test-slow bench bench-families fashion-mnist check clean

help:
	@echo "make demo       set up .venv and run configs/quickstart.toml (digits, FedAvg) + plots"
	@echo "make test       set up .venv and run the test suite (slow tests excluded)"
	@echo "make test-slow  run only the slow end-to-end tests"
	@echo "make bench      run the benchmarks (several minutes each)"
	@echo "make bench-families  the logit- and kd-family tables (installs Debian's Fashion-MNIST as root)"
	@echo "make check      ruff + mypy"
	@echo "make fuzz       the atheris fuzz harness over decoders, configs and readers (FUZZ_TIME s per target)"
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
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,flower,privacy]"
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

# Debian packages the official Fashion-MNIST archives; kdfl finds them in FMNIST_DIR
FMNIST_DIR = /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else echo "Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu), or put" \
		"the four official .gz files in a directory named by KDFL_DATA_DIR (kdfl's error lists them)"; exit 1; fi

# the algorithm-family tables of the README (mnist1d and Fashion-MNIST; an hour or more on 2 cores)
bench-families: $(STAMP) fashion-mnist
	$(BIN)/python benchmarks/logit_family.py --dataset mnist1d
	$(BIN)/python benchmarks/logit_family.py --dataset fashion_mnist
	$(BIN)/python benchmarks/kd_family.py --workers 2

check: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache

# coverage-guided fuzzing of the parsers (wire format, codecs, config loader, data-set readers)
# with atheris: FUZZ_TIME seconds per target; a crash stops the target and leaves fuzz/crash-*
FUZZ_TIME ?= 60
FUZZ_TARGETS = wire codecs config datasets
.PHONY: fuzz
fuzz: $(STAMP)
	$(BIN)/python fuzz/make_corpus.py
	for t in $(FUZZ_TARGETS); do \
		$(BIN)/python fuzz/run.py $$t fuzz/corpus/$$t -max_total_time=$(FUZZ_TIME) -artifact_prefix=fuzz/ \
			-print_final_stats=1 || exit 1; done
