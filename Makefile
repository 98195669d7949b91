# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP    = $(VENV)/.installed

.PHONY: install ds-ops demo test bench clean

# DeepSpeed's JIT ops (CPUAdam, the CPU shared-memory comm op) are built once into the venv, not by every launch
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
OPS      = $(VENV)/.ds-ops

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: on a CPU-only machine this is the CPU wheel; a bare `torch` would pull CUDA.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(OPS): $(STAMP)
	$(BIN)/python -m gentrain.launch.distributed.build_ops
	touch $(OPS)

ds-ops: $(OPS)

demo: $(STAMP)
	$(BIN)/gentrain demo

test: $(STAMP) $(OPS)
	$(BIN)/python -m pytest -q -x --durations=15 tests

bench: $(STAMP)
	$(BIN)/python bench/trainer_overhead.py

clean:
	rm -rf runs exports bench/results
