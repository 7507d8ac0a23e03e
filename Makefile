# ebpflb: `make demo` and `make test` are the two commands a newcomer runs.
# Each runs `make setup` first, which installs what is missing and says so.

VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test unit lint proto clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/ebpflb demo

test: setup lint
	$(PYTEST) tests

unit: setup
	$(PYTEST) -m "unit or api" tests

lint: setup
	$(VENV)/bin/ruff check ebpflb tests
	$(VENV)/bin/mypy

# The one command that makes the generated gRPC code in ebpflb/api/.
proto:
	@bash scripts/genproto.sh ebpflb/api

clean:
	rm -rf $(VENV) .setup-stamp *.egg-info .pytest_cache .mypy_cache .ruff_cache
