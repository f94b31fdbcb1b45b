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

DEMO ?= resnet18_full
demo: $(BIN)/.installed
	$(BIN)/graphprune analyze $(DEMO) --summary
	$(BIN)/graphprune compile $(DEMO) --ratio 0.5 -o out/$(DEMO).pt
	$(BIN)/graphprune export $(DEMO) --load out/$(DEMO).pt -o out/$(DEMO).onnx --bench --runs 20
	@echo "files: out/$(DEMO).pt (graphprune.load), out/$(DEMO).onnx (verified)"
	@echo "in Python: pruned = gp.compile(model, gp.Plan(ratio=0.5), x)"
	@echo "           gp.export_onnx(pruned, x, 'out/$(DEMO).onnx', baseline=model)"

lint: $(BIN)/.installed
	$(BIN)/ruff check graphprune passes models tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q
