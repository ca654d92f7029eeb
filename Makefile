# The two entry points of the README: `make demo` and `make test`.
# Each creates .venv itself on a fresh machine (Python 3.11, pinned wheels, ~2.5 min, ~6.6 GB).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CHECKOV := .venv-checkov/bin/checkov
APT_PACKAGES := dataset-fashion-mnist chromium chromium-driver

.PHONY: demo test lint system-deps bench compare compare-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

## Install and run the main job on the embedded default (digits, local Ray, SQLite MLflow).
demo: $(STAMP)
	$(BIN)/n2n run

## Install and run the whole test suite (real Ray, RLlib, KD training, mlflow server, Chromium).
test: $(STAMP) $(CHECKOV) system-deps
	$(BIN)/ruff check envs pipeline tests benchmarks
	$(BIN)/pytest

## checkov scans the rendered chart (tests/test_chart_security.py); its pins conflict with ours.
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/pip install -q checkov==3.3.30

## Debian packages the tests use: Fashion-MNIST files and a headless browser (root only).
system-deps:
	@if dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	else echo "note: install $(APT_PACKAGES) (Debian) or the tests that need them will skip"; fi

lint: $(STAMP)
	$(BIN)/ruff check envs pipeline tests benchmarks
	$(BIN)/ruff format --check envs pipeline tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/child_eval.py

## The head-to-head benchmark on Fashion-MNIST (N2N PPO/APPO, random, classic compressors).
compare: $(STAMP) system-deps
	$(BIN)/python benchmarks/compare.py --seeds 3

## The same on digits with tiny budgets (minutes).
compare-quick: $(STAMP)
	$(BIN)/python benchmarks/compare.py --quick

clean:
	rm -rf $(VENV) .venv-checkov .pytest_cache runs mlruns mlflow.db
