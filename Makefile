# medssl — the two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0 is pinned first so that pip does not pull a newer (multi-GB CUDA) build on CPU machines.
TORCH_PIN ?= torch==2.13.0
# Every other dependency is pinned by constraints.txt (the Docker image installs through it too); `make lock`
# rewrites it from the environment the tests passed in.
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?= -n 2

.PHONY: setup demo test lint lock clean

$(BIN)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS) -e ".[dev,demo]"
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

# Pin every installed distribution (local labels such as +cpu dropped: the image picks its own torch build).
lock:
	{ echo "# Exact versions the test suite passed with; used by make setup and docker/Dockerfile (make lock)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > $(CONSTRAINTS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info outputs/demo
