# Two entry points for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

.PHONY: install demo test lint
install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/graphprune analyze resnet18 --explain layer1.0.conv1 --explain fc

lint: $(BIN)/.installed
	$(BIN)/ruff check graphprune passes models tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q
