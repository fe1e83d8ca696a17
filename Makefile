# The commands the README shows. `make demo` and `make test` work on a fresh machine: they create
# .venv, install torch (CUDA build where an NVIDIA driver is present, CPU build otherwise), install
# dist_glm with the exact versions CI tested (constraints.txt), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every install is pinned to what CI tested; `make test-latest` empties this to try the newest releases.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)
# Used only on a CPU-only machine whose pip cannot already see a local CPU build of torch (pip's
# find-links). A local build is installed without dependencies first, so pip never swaps it for a
# newer CUDA build, then its dependencies are resolved against it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
# DeepSpeed's just-in-time ops are built per venv: a shared ~/.cache build is rebuilt (and its lock
# fought over) whenever another checkout with different include paths uses it.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup demo test test-fast test-latest doctor lint clean bench

setup: $(VENV)/.installed

# torch is pinned to the tested release in every branch; only the build (CUDA or CPU) differs.
$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing the CUDA build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install "torch==$(TORCH_VERSION)"; \
	elif $(BIN)/pip install --no-index --no-deps "torch==$(TORCH_VERSION)" >/dev/null 2>&1; then \
		echo "CPU-only machine: installed the local CPU build of torch $(TORCH_VERSION); now its dependencies"; \
		$(BIN)/pip install $(PIN) "torch==$(TORCH_VERSION)"; \
	else \
		echo "CPU-only machine: installing the CPU build of torch $(TORCH_VERSION)"; \
		$(BIN)/pip install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(BIN)/pip install $(PIN) -e .
	@# mpirun launches need mpi4py (rank 0's address is broadcast through MPI); only where MPI exists.
	@if command -v mpirun >/dev/null 2>&1; then $(BIN)/pip install $(PIN) "mpi4py>=3.1"; fi
	$(BIN)/python -m dist_glm.runtime.ops
	$(BIN)/python -m dist_glm.runtime.doctor --brief
	touch $@

# What the tests add (pytest, ruff, the openai client, wandb, ...): not needed to run the demo.
$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install $(PIN) -e ".[dev]"
	@# serve.py --tool_call_arguments=constrained (xgrammar) for its tests, without the 1 GB of triton that
	@# xgrammar's Linux wheel asks for and only uses on a GPU (a CUDA torch brings triton anyway).
	$(BIN)/pip install $(PIN) --no-deps "xgrammar>=0.2.9,<0.3" "apache-tvm-ffi>=0.1.11,<0.2"
	touch $@

# The deepspeed launcher's own default port (29500) may be taken by another job: use MASTER_PORT when
# given, else a free one. DEMO_ARGS: extra flags (the tests shorten the run with them).
# --quiet and, without a GPU, DS_ACCELERATOR=cpu: the launcher's own chatter ("Setting accelerator to CPU",
# "Unable to find hostfile", its command lines) is not printed; the run's own log is unchanged.
DS_CPU := $(if $(shell command -v nvidia-smi 2>/dev/null),,DS_ACCELERATOR=cpu)
demo: setup
	$(DS_CPU) $(BIN)/deepspeed --quiet --master_port $${MASTER_PORT:-$$($(BIN)/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')} launch/train.py $(DEMO_ARGS)

test: setup $(VENV)/.dev-installed
	$(BIN)/python -m pytest

test-fast: setup $(VENV)/.dev-installed
	$(BIN)/python -m pytest -m "not slow"

# The suite against the newest releases of every dependency (setup.py's upper bounds dropped), in its
# own venv, so that drift is found here before users meet it. torch stays at the tested release: a
# newer one is a multi-GB CUDA download on a CPU-only machine.
test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS= DIST_GLM_LATEST=1

doctor: setup
	$(BIN)/python -m dist_glm.runtime.doctor

# Training speed against HF Trainer, TRL and LLaMA-Factory, each installed into its own venv under
# ~/.cache/dist_glm_bench (docs/performance.md); e.g. make bench BENCH_ARGS="--workloads=tiny --rounds=2".
bench: setup
	$(BIN)/python launch/benchmark.py $(BENCH_ARGS)

lint: setup $(VENV)/.dev-installed
	$(BIN)/ruff check dist_glm launch tests benchmarks
	$(BIN)/ruff format --check dist_glm launch tests benchmarks

clean:
	rm -rf $(VENV) .venv-latest out
