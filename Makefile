# The two README commands, and the pieces they are made of. Every target installs first.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install vllm-env quickstart test test-fast test-soak test-vllm lint

install:
	@bash scripts/install.sh

# The vLLM serving environment (.venv-vllm) for `backend: vllm`; `make vllm-env KIND=gpu` on
# GPU nodes.
vllm-env: install
	@bash scripts/install-vllm.sh $(or $(KIND),cpu)

# The main job on the embedded default: local Ray, the built-in model, the shipped data.
quickstart: install
	$(BIN)/ftservice train cluster/jobs/quickstart.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Everything but the soak tests: lint, then all tests (slow ones and the vLLM backend's included).
test: lint vllm-env
	$(BIN)/python -m pytest

# The long load tests (1000-vote storms on SQLite and PostgreSQL).
test-soak: install
	$(BIN)/python -m pytest -m soak

# The `backend: vllm` tests only.
test-vllm: vllm-env
	$(BIN)/python -m pytest -m vllm

# While working: the fast tests only (no Ray, no training, no PostgreSQL).
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not pg and not soak"
