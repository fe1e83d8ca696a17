# The commands the README shows. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch (CUDA build where an NVIDIA driver is present, CPU build otherwise), install
# dist_glm, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Used only on a CPU-only machine whose pip cannot already see a local CPU build of torch (pip's
# find-links). A local build is installed without dependencies first, so pip never swaps it for a
# newer CUDA build, then its dependencies are resolved against it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
# DeepSpeed's just-in-time ops are built per venv: a shared ~/.cache build is rebuilt (and its lock
# fought over) whenever another checkout with different include paths uses it.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing the CUDA build of torch"; \
		$(BIN)/pip install "torch>=2.4"; \
	elif $(BIN)/pip install --no-index --no-deps "torch>=2.4" >/dev/null 2>&1; then \
		echo "CPU-only machine: installed the local CPU build of torch; now its dependencies"; \
		$(BIN)/pip install "torch==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("torch"))')"; \
	else \
		echo "CPU-only machine: installing the CPU build of torch"; \
		$(BIN)/pip install "torch>=2.4" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install -e ".[dev]"
	@# mpirun launches need mpi4py (rank 0's address is broadcast through MPI); only where MPI exists.
	@if command -v mpirun >/dev/null 2>&1; then $(BIN)/pip install "mpi4py>=3.1"; fi
	$(BIN)/python -m dist_glm.ops
	touch $@

demo: setup
	$(BIN)/deepspeed launch/train.py

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check dist_glm launch tests
	$(BIN)/ruff format --check dist_glm launch tests

clean:
	rm -rf $(VENV) out
