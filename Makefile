PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install run test lint typecheck check bench soak fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
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
	$(BIN)/python -m pytest -q -s -m slow tests/test_crash_recovery.py $(PYTEST_ARGS)

fuzz: $(STAMP)
	FUZZ_FRAMES=$${FUZZ_FRAMES:-100000} $(BIN)/python -m pytest -q -m slow tests/test_hostile_input.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
