# srdit — two commands on a fresh machine: `make study` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?= studies/digits_quick.yaml
STATE ?= state
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED = 1

.PHONY: setup test test-fast format study report ui bench docs clean

setup: $(STAMP)

# Re-runs only when the dependency declaration changes. Without CUDA, take the CPU torch first so that the
# resolver never pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Lint and format check first (one config: pyproject's [tool.ruff]); then the suite on two workers, a test file per
# worker at a time (module fixtures such as a test module's private Ray stay in one process), in the order of
# tests/conftest.py (longest files first) rather than xdist's default (files with the most tests first). A third
# worker on two cores is slower: one run had done 59 % of the tests after 16 minutes, with one failure, where two
# workers pass them all in about 15.
test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -ra --timeout=900 --durations=10 -n 2 --dist loadfile --no-loadscope-reorder

# Rewrites the tree to the house style that `make test` checks.
format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" --timeout=600

study: setup
	$(BIN)/srdit study run $(STUDY) --state $(STATE)
	$(BIN)/srdit report $(STUDY) --state $(STATE)

report: setup
	$(BIN)/srdit report $(STUDY) --state $(STATE)

ui: setup
	$(BIN)/srdit ui --state $(STATE)

# The benchmarks, then the tables of bench/README.md and README.md rendered from bench/*.json.
bench: setup
	$(BIN)/python bench/run.py --out bench/results.json
	$(BIN)/python bench/tables.py

# The reference pages from the code, then the site into site/ (warnings are errors: a broken link fails).
docs: setup
	$(BIN)/python docs/gen_reference.py
	$(BIN)/python bench/tables.py
	$(BIN)/mkdocs build --strict --quiet --site-dir site

clean:
	rm -rf $(STATE) runs site dashboards/*/ dashboards/index.html dashboards/RECORDS.md .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
