# Two commands on a fresh machine: `make run` (set up and serve) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= .broker-dev
# `make run ADMIN_ADDR=127.0.0.1:6051 RESOLVE_ADDR=127.0.0.1:6052 METRICS_ADDR=` (empty: no metrics).
ADMIN_ADDR ?= 127.0.0.1:50051
RESOLVE_ADDR ?= 127.0.0.1:50052
METRICS_ADDR ?= 127.0.0.1:9464

.PHONY: install run test lint proto clean bench bench-rss

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/broker dev --data-dir $(DATA_DIR) --admin-addr $(ADMIN_ADDR) --resolve-addr $(RESOLVE_ADDR) \
		--metrics-addr '$(METRICS_ADDR)'

lint: install
	$(BIN)/ruff check src tests proto
	$(BIN)/ruff format --check src tests proto
	$(BIN)/mypy --strict src

test: lint
	$(BIN)/pytest -q

# Resolve against a bare grpc.aio echo server, 10,000 connections, then 1 vs 2 broker replicas on
# PostgreSQL if BROKER_BENCH_POSTGRES_DSN or BROKER_TEST_POSTGRES_DSN is set (~3.5 min); docs/PERFORMANCE.md.
bench: install
	$(BIN)/python -m bench

# Server RSS with 100,000 stored connections (seeding takes ~2 min).
bench-rss: install
	$(BIN)/python -m bench --rss

proto: install
	$(BIN)/python proto/generate.py

clean:
	rm -rf $(VENV) $(DATA_DIR) .pytest_cache .mypy_cache .ruff_cache
