# One virtual environment for everything; each target installs what it needs first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo check test unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: the CPU build, no CUDA downloads.
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	# Validating the default config builds its pipeline, which compiles the numba kernels once
	# now (numba caches them next to the sources): otherwise the first process after an install
	# spends ~10 s compiling before it scores anything.
	$(BIN)/stream-detector config validate config/detector.yaml
	# Best effort: Debian's prometheus package gives the observability tests promtool and a real
	# Prometheus server (tests/integration/test_observability.py skips them when it is missing).
	@if [ "$$(id -u)" = 0 ]; then command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) || echo "prometheus not installed: its tests will skip"; else command -v promtool >/dev/null || echo "prometheus not installed (not root): its tests will skip"; fi
	# Best effort: socat is the TLS proxy of tests/integration/test_resilience.py (skipped without it).
	@[ "$$(id -u)" != 0 ] || command -v socat >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq socat >/dev/null) || echo "socat not installed: the TLS test will skip"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## embedded broker + synthetic sales + detector; anomalies printed, metrics on :9108
	$(BIN)/stream-detector demo

check: $(STAMP)  ## lint, format and type checks; fails on any finding
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP)  ## the checks, then unit and integration tests (integration tests start an embedded broker)
	$(MAKE) --no-print-directory check
	$(BIN)/python -m pytest

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration"

integration: $(STAMP)
	$(BIN)/python -m pytest -m integration

bench: $(STAMP)  ## benchmarks (not tests): one table, ratios against baselines measured in the same run
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache .ruff_cache *.egg-info
