# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kexue-installed
OUT    ?= tour-report

.PHONY: demo test install lint typecheck docs package-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/kexue tour --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks .ci
	$(BIN)/ruff format --check src tests benchmarks .ci
	$(BIN)/mypy

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

package-check: $(STAMP)
	.ci/package-check

bench: $(STAMP)
	$(BIN)/python benchmarks/losses.py

clean:
	rm -rf $(VENV) $(OUT) site .pytest_cache .ruff_cache .mypy_cache .hypothesis test-artifacts
