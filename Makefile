# Set-up and the two commands of the README. Each target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The pinned torch, installed only when .venv has none (a torch already there is never replaced).
# From PyPI on Linux this pin is the CUDA build; for the CPU build:
# make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test test-fast test-numerics demo bench bench-quick bench-gpu clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The tests marked numerics once per setting of another CPU (threads, vector kernels): tests/numerics_sweep.py
test-numerics: install
	$(BIN)/python tests/numerics_sweep.py

demo: install
	$(BIN)/qformer demo

# The benchmark suite (bench/run.py): one JSON line per benchmark, ours against the reference.
bench: install
	$(BIN)/python bench/run.py

bench-quick: install
	$(BIN)/python bench/run.py --quick

bench-gpu: install
	$(BIN)/python bench/run.py --device cuda

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
