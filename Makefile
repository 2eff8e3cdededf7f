# One virtual environment for everything; each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: the CPU build, no CUDA downloads.
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## embedded broker + synthetic sales + detector; anomalies printed, metrics on :9108
	$(BIN)/stream-detector demo

test: $(STAMP)  ## unit and integration tests (integration tests start an embedded broker)
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

integration: $(STAMP)
	$(BIN)/python -m pytest -m integration

bench: $(STAMP)  ## benchmarks (not tests): prints tables with ratios against baselines
	$(BIN)/python bench/bench_hst.py
	$(BIN)/python bench/bench_autoencoder.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
