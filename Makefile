# Each target sets up what it needs in a virtual environment in .venv, made with
# --system-site-packages so that what the machine already has is used:
#
# - when torch and the test and demo requirements already import (a GPU machine
#   with its own torch, or a prepared dev machine), this package is installed
#   with --no-deps --no-build-isolation and nothing is downloaded: it works offline;
# - otherwise (a fresh machine), torch is installed if it does not import
#   (`pip install torch==2.13.0`: the CPU build where there is no GPU), then the
#   build requirements, then this package with its test and demo extras.
#
# The build never runs in an isolated environment: setup.py builds the C++
# extension against the torch already installed (an isolated build would fetch
# another torch). A .venv made by an older Makefile without system packages is
# used as it is; `make clean` removes it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlbfgs-installed
# Import names of the requirements (setup.py: install_requires and the test and demo extras).
REQUIRED_IMPORTS := torch,triton,pytest,pytest_benchmark,numpy,scipy,sklearn,matplotlib,tqdm
BUILD_IMPORTS := setuptools,wheel
# Sources whose change means a rebuild (the C++ extension, when there is one).
BUILD_INPUTS := setup.py pyproject.toml $(wildcard CMakeLists.txt csrc/*.* csrc/*/*.*)
PYTEST_ARGS ?=
BENCH_ARGS ?=
VALIDATE_ARGS ?=
CHECK_ARGS ?=
# Where `make gpu-check` leaves its few files: $OUT/gpu on a GPU machine (OUT is its
# output folder there), else GPU_CHECK_OUT.
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT)/gpu,/tmp/mlbfgs-gpu-check)

.PHONY: test demo bench gpu-validate gpu-check fashion-mnist env clean

# A PYTHON that itself runs in a virtual environment (a GPU machine's image keeps its
# torch in one) hands its packages on to .venv through a .pth file: --system-site-packages
# alone gives the base interpreter's packages, without that torch.
$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || { $(PYTHON) -m venv --system-site-packages $(VENV) && \
	  $(PYTHON) -c "import site, sys; sys.prefix != sys.base_prefix and print(*site.getsitepackages(), sep=chr(10))" \
	    > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/outer-site-packages.pth"; }
	if $(PY) -c "import $(REQUIRED_IMPORTS),$(BUILD_IMPORTS)" 2>/dev/null; then \
	  echo "requirements already importable: installing this package only, offline"; \
	  $(PY) -m pip install --no-deps --no-build-isolation -e .; \
	else \
	  $(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0; \
	  $(PY) -c "import $(BUILD_IMPORTS)" 2>/dev/null || $(PY) -m pip install setuptools wheel ninja; \
	  $(PY) -m pip install --no-build-isolation -e ".[test,demo]"; \
	fi
	touch $@

env: $(STAMP)

# Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 so the Triton kernels
# run on the CPU through the interpreter; with one, they run on the GPU.
# PYTEST_ARGS: extra pytest options, e.g. PYTEST_ARGS="-x -k foreach".
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m mlbfgs_fused.demo

# BENCH_ARGS: options of bench.run, e.g. BENCH_ARGS="--only compare,memory --max-n 1e6".
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

# A whole GPU validation in one call (tests, CUDA-only tests, compute-sanitizer,
# benchmarks), e.g. VALIDATE_ARGS="--out /tmp/h100 --budget 540"; see bench/gpu_validate.py.
gpu-validate: $(STAMP)
	$(PY) -m bench.gpu_validate $(VALIDATE_ARGS)

# The first GPU run in one call of at most 8 minutes, the build included (bench/README.md,
# "GPU check"): `python -m bench.gpu_validate --check`. It runs on .venv's Python where
# .venv exists, else on PYTHON as it is when that imports torch and pytest (a GPU
# machine's image: the check's build stage installs this package into it, offline), else
# on a new .venv. CHECK_ARGS: more options, e.g. --dry (anywhere, in about a minute).
gpu-check:
	@if [ -x $(PY) ]; then py=$(PY); \
	elif $(PYTHON) -c "import torch, pytest" 2>/dev/null; then py=$(PYTHON); \
	else $(MAKE) --no-print-directory env && py=$(PY); fi; \
	echo "$$py -m bench.gpu_validate --check --out $(GPU_CHECK_OUT) $(CHECK_ARGS)"; \
	exec $$py -m bench.gpu_validate --check --out $(GPU_CHECK_OUT) $(CHECK_ARGS)

# A copy of Fashion-MNIST's idx files in data/fashion-mnist/ (ignored by git, about
# 30 MB), to carry to a machine without network or Debian's package; point
# MLBFGS_FASHION_MNIST_DIR at it there. Installs Debian's package first when root can.
FASHION_MNIST_SRC := /usr/share/datasets/fashion-mnist
fashion-mnist:
	test -f $(FASHION_MNIST_SRC)/train-images-idx3-ubyte.gz || apt-get install -y dataset-fashion-mnist
	mkdir -p data/fashion-mnist
	cp $(FASHION_MNIST_SRC)/*-ubyte.gz data/fashion-mnist/

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
