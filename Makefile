# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP    = $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: on a CPU-only machine this is the CPU wheel; a bare `torch` would pull CUDA.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/gentrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --durations=15 tests

bench: $(STAMP)
	$(BIN)/python bench/trainer_overhead.py

clean:
	rm -rf runs exports bench/results
