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
	$(BIN)/graphprune analyze resnet18 --explain layer1.0.conv1
	$(BIN)/graphprune compile resnet18 --ratio 0.5 --importance l2 -o out/resnet18-pruned.pt

lint: $(BIN)/.installed
	$(BIN)/ruff check graphprune passes models tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q
