# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Each creates .venv with the exact versions of requirements.lock on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The benchmarks (bench/ also holds their shared modules).
BENCHES := bench/ingest.py bench/stream_eval.py bench/inference.py bench/unknown_defect.py bench/soak.py

.PHONY: run test check lint proto docs bench clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)  ## start the service on embedded defaults and stream simulated cameras into it
	$(BIN)/cl-service demo

test: $(STAMP)  ## the whole default test suite, as CI runs it: on SQLite, then on a throwaway PostgreSQL server
	$(BIN)/python -m pytest
	$(BIN)/python scripts/test_postgres.py

check: lint test  ## lint, types and tests

lint: $(STAMP)  ## format check, lint (ruff) and types (mypy)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

proto: $(STAMP)  ## regenerate the gRPC stubs from protos/
	PYTHON=$(BIN)/python scripts/gen_protos.sh

docs: $(STAMP)  ## regenerate docs/api-reference.md from the .proto comments
	$(BIN)/python scripts/gen_api_docs.py

bench: $(STAMP)  ## run every benchmark in bench/ and write bench/results/
	for script in $(BENCHES); do $(BIN)/python $$script || exit 1; done
	$(BIN)/python scripts/bench_table.py

clean:
	rm -rf $(VENV) cl-data .pytest_cache .mypy_cache .ruff_cache
