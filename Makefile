# The two README commands, and the pieces they are made of. Every target installs first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install quickstart test test-fast lint

install:
	@bash scripts/install.sh

# The main job on the embedded default: local Ray, the built-in model, the shipped data.
quickstart: install
	$(BIN)/ftservice train cluster/jobs/quickstart.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything: lint, then all tests (slow ones included).
test: lint
	$(BIN)/python -m pytest

# While working: the fast tests only.
test-fast: install
	$(BIN)/python -m pytest -m "not slow"
