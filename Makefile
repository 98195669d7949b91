# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP    = $(VENV)/.installed

.PHONY: install ds-ops demo test bench gpu-wheels clean

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
	$(BIN)/python -m gentrain.distributed.build_ops
	touch $(OPS)

ds-ops: $(OPS)

demo: $(STAMP)
	$(BIN)/gentrain demo

# the house first (import contracts: .importlinter), then the docs (`mkdocs build --strict` fails on a
# broken link, a missing page or a page not in the nav), then the tests
test: $(STAMP) $(OPS)
	$(BIN)/lint-imports --no-cache
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site
	$(BIN)/python -m pytest -q -x --durations=15 tests

bench: $(STAMP)
	$(BIN)/python bench/trainer_overhead.py

# what bench/gpu_step.py needs on the GPU machine beyond its image (torch, accelerate, transformers,
# peft are there): pure-python wheels into .whl/ (ignored by git), carried by the device tool's run
GPU_WHEELS = diffusers==0.42.1 webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0 importlib-metadata==10.2.0 lazy-importer==0.1.0
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf runs exports bench/results site
