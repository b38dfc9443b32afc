PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed-run
# The project runs from its checkout (run.py, client.py at the top), so only its dependencies are
# installed, read from pyproject.toml: `make run` takes the service's, everything else the dev
# tools too. (An editable install of this flat layout only added a setuptools warning.)
DEPS = $(BIN)/python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + [d for x in sys.argv[1:] for d in p["optional-dependencies"][x]]))'

.PHONY: install run test lint typecheck check bench soak soak-memory fuzz clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(VENV)/bin/python
	$(DEPS) > $(VENV)/requirements-run.txt
	$(BIN)/pip install -q -r $(VENV)/requirements-run.txt
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(DEPS) dev > $(VENV)/requirements-dev.txt
	$(BIN)/pip install -q -r $(VENV)/requirements-dev.txt
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/python run.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy .

check: lint typecheck test

bench: $(STAMP)
	$(BIN)/python bench.py $(ARGS)

soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -m slow tests/test_crash_recovery.py tests/test_nodes.py $(PYTEST_ARGS)

# One node, 1,000,000 orders at 100 in flight: RSS every second, then a restart on that database
# (docs/performance.md "Memory"). About 10 minutes; ARGS="--orders 100000" for a shorter one.
soak-memory: $(STAMP)
	$(BIN)/python -m benchmarks.soak_memory $(ARGS)

fuzz: $(STAMP)
	FUZZ_FRAMES=$${FUZZ_FRAMES:-100000} $(BIN)/python -m pytest -q -m slow tests/test_hostile_input.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
