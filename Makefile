# Each target sets up everything it needs on a fresh machine: a virtual
# environment in .venv, torch only if it is not importable there
# (`pip install torch==2.13.0` takes the CPU build on machines without a GPU),
# then this package with its test and demo extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlbfgs-installed

.PHONY: test demo bench env clean

$(STAMP): setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install setuptools wheel ninja
	# --no-build-isolation: the C++ kernels build against the torch installed above
	# (an isolated build would fetch its own torch).
	$(PY) -m pip install --no-build-isolation -e ".[test,demo]"
	touch $@

env: $(STAMP)

# Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 so the Triton kernels
# run on the CPU through the interpreter; with one, they run on the GPU.
test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m mlbfgs_fused.demo

# BENCH_ARGS: options of bench.run, e.g. BENCH_ARGS="--only compare,memory --max-n 1e6".
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
