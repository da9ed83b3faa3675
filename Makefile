# BeTrace developer entry points. The two that matter on a fresh machine:
#   make demo   install everything, start a local Kafka broker and run the demo
#   make test   install everything, lint, type-check and run the whole test suite
.PHONY: setup demo test lint unit integration bench dev-up dev-down clean lock

VENV := .venv/bin
PYTEST_ARGS ?=

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/betrace demo

lint: setup
	$(VENV)/ruff check src tests benchmarks
	$(VENV)/ruff format --check src tests benchmarks
	$(VENV)/mypy

test: lint
	bash scripts/run-tests.sh $(PYTEST_ARGS)

unit: setup
	$(VENV)/python -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(VENV)/python -m pytest tests/integration $(PYTEST_ARGS)

bench: setup
	$(VENV)/python benchmarks/bench_pipeline.py

dev-up: setup
	$(VENV)/betrace dev up

dev-down:
	$(VENV)/betrace dev down

lock:
	$(VENV)/pip freeze --exclude-editable | grep -v '^betrace' > requirements.lock

clean:
	-$(VENV)/betrace dev down --clean
	rm -rf .dev
