# vmsnap: `make demo` and `make test` work on a fresh Debian 12 machine as root.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: bootstrap lint test demo bench bench-quick bench-peers clean

bootstrap:
	@bash scripts/bootstrap.sh

lint: bootstrap
	$(BIN)/ruff check vmsnap tests benchmarks
	$(BIN)/ruff format --check vmsnap tests benchmarks
	$(BIN)/mypy --strict vmsnap

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

demo: bootstrap
	$(BIN)/vmsnap demo

bench: bootstrap
	$(BIN)/vmsnap bench --out benchmarks/results

bench-quick: bootstrap
	$(BIN)/vmsnap bench --quick --out benchmarks/results

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
