# medssl — the two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is pinned first so that pip does not pull a newer (multi-GB CUDA) build on CPU machines.
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[dev,demo]"
	touch $@

setup: $(BIN)/.installed

# A short joint pretraining on real images shipped by pip packages; prints where the MLflow run is.
demo: setup
	$(BIN)/medssl demo

test: setup
	$(BIN)/ruff check medssl tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check medssl tests benchmarks
	$(BIN)/ruff format --check medssl tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info outputs/demo
