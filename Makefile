# Two commands on a fresh machine with Python 3.11 and make:  `make run`  and  `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast test-cluster bench grid report notebook clean help

help:
	@echo "make install | run [ARGS='compressor=dq'] | test | test-fast | test-cluster | bench | grid | report | notebook | clean"

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

# The SLURM tests on a one-node cluster started here (root; installs Debian's slurm/munge/slurmdbd/MariaDB when
# missing) and stopped afterwards: tests/cluster/cluster.sh. PYTEST_ARGS go to pytest, e.g. PYTEST_ARGS='-k cancel'.
test-cluster: install
	PYTHON=$(abspath $(BIN))/python tests/cluster/cluster.sh test $(PYTEST_ARGS)

# ARGS here go to run_all.py, e.g. ARGS='--quick' or ARGS='--only train,eval'
bench: install
	$(BIN)/python -c "import accelerate" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py $(ARGS)

grid: install
	$(BIN)/python -m subgroup_robustness --multirun experiment=offline_grid $(ARGS)

report: install
	$(BIN)/python -m subgroup_robustness.report logs $(ARGS)

# notebooks/analysis.ipynb in JupyterLab (the `notebook` extra, installed on first use). ARGS go to jupyter lab,
# e.g. ARGS='--no-browser --port 8899'.
notebook: install
	$(BIN)/python -c "import jupyterlab" 2>/dev/null || $(BIN)/python -m pip install --quiet -e ".[notebook]"
	$(BIN)/python -m jupyterlab notebooks/analysis.ipynb $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

clean:
	rm -rf logs outputs multirun .pytest_cache
