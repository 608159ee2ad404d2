# Two commands on a fresh machine with Python 3.11 and make:  `make run`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench grid report clean help

help:
	@echo "make install | run [ARGS='compressor=dq'] | test | test-fast | bench | grid | report | clean"

install: $(STAMP)

# torch==2.13.0 first: the local CPU wheel. A bare `torch` would download GBs of CUDA builds.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m subgroup_robustness.assets
	touch $(STAMP)

run: install
	$(BIN)/python -m subgroup_robustness $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# ARGS here go to run_all.py, e.g. ARGS='--quick' or ARGS='--only train,eval'
bench: install
	$(BIN)/python -c "import accelerate" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py $(ARGS)

grid: install
	$(BIN)/python -m subgroup_robustness --multirun experiment=offline_grid $(ARGS)

report: install
	$(BIN)/python -m subgroup_robustness.report logs $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
