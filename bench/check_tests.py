"""Which tests the GPU check runs, in which stage: the one list (bench/README.md, "GPU check").

``python -m bench.gpu_validate --check`` runs the tests in three pytest calls, each with
this module as a plugin (``-p bench.check_tests --check-select=STAGE``):

``cuda``    the tests that need a GPU (``bench.cuda_only``'s rule: the ``cuda`` marker or a
            skip reason naming CUDA or a GPU), less those of :data:`PARITY` and :data:`LATER`;
            among them the CUDA graph captures and replays of :data:`GRAPH` (pair steps
            captured and replayed);
``parity``  :data:`PARITY`, in its order: each CUDA backend against the float64 reference,
            chosen so that every kernel, parameter dtype and history dtype runs at least
            once (:data:`REQUIRED` says what must be covered; the tests check it);
``rest``    everything else, :data:`LATER` and the files of :data:`REST_FIRST` first, the tests
            marked ``slow`` last, when time remains.

``--check-report=FILE`` writes what was selected and which ids of :data:`PARITY` were not
collected. Every id exists on every machine (tests/cases.py parametrizes over every
registered backend, skipped where it cannot run); ``--check-pretend-cuda`` makes
``backend="cuda"`` look available while collecting (for checking this list as a machine
with the CUDA C++ kernels collects it, never for running tests).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from .cuda_only import needs_cuda

KERNELS = ("gradient_dots", "two_loop", "update", "push")  # each backend's passes of one step
ALL = KERNELS


class Case(NamedTuple):
    nodeid: str
    backend: str  # "triton" or "cuda" (the CUDA C++ kernels)
    dtype: str  # of the parameters
    history: str  # of the history rings
    kernels: tuple[str, ...] = ALL
    what: str = ""


_P = "tests/test_parity.py::"
_T = "tests/test_triton_optimizer.py::"
_K = "tests/test_triton_kernels.py::"


def _whole(backend: str, test: str, params: str, dtype: str, history: str, what: str = "") -> Case:
    """A whole-step case of tests/test_parity.py on ``backend`` (its id starts with it)."""
    return Case(f"{_P}{test}[{backend}-{params}]", backend, dtype, history, what=what)


_PRECISIONS = {  # tests/cases.py's NARROW: id -> (parameter dtype, history dtype)
    "f32-bf16": ("float32", "bfloat16"), "f32-f16": ("float32", "float16"), "f64-f32": ("float64", "float32"),
    "f16-f16": ("float16", "float16"), "bf16-bf16": ("bfloat16", "bfloat16"), "bf16-f32": ("bfloat16", "float32"),
}

PARITY: tuple[Case, ...] = (
    # Triton, whole steps against the float64 reference (tests/test_parity.py).
    _whole("triton", "test_matches_reference", "paper-f32-f32-tensor", "float32", "float32",
           "blocks per tensor, damping, a skipped pair, the ring wrapped, non-finite steps"),
    _whole("triton", "test_matches_reference", "paper-f32-f32-13", "float32", "float32", "blocks that cut tensors"),
    _whole("triton", "test_matches_reference", "paper-f64-f64-tensor", "float64", "float64",
           "every per-element state vector too"),
    _whole("triton", "test_flags_match_reference", "never-maximize", "float64", "float64",
           "maximize, weight decay, no normalisation"),
    *(_whole("triton", "test_precision_matches_reference", f"{p}-paper", *_PRECISIONS[p])
      for p in ("f32-bf16", "f32-f16", "f64-f32", "f16-f16", "bf16-bf16")),
    _whole("triton", "test_matches_reference", "released-f32-f32-tensor", "float32", "float32", 'variant="released"'),
    _whole("triton", "test_amp_grad_scale_and_found_inf", "paper", "float32", "float32",
           "GradScaler's scale and inf check"),
    _whole("triton", "test_a_non_finite_gradient_in_one_group_skips_every_group", "nan-in-group0", "float64",
           "float64", "a non-finite gradient skips the step; a foreach group beside it"),
    _whole("triton", "test_a_group_of_two_dtypes_steps_as_one_group", "paper", "float64", "float64",
           "float32 and float64 arenas in one group"),
    Case(_T + "test_aligned_specialization_when_every_tile_starts_on_16_elements", "triton", "float32", "float32",
         what="the aligned specialization (vector loads)"),
    _whole("triton", "test_parameters_in_other_memory_orders", "channels_last", "float32", "float32",
           "channels_last parameters"),
    _whole("triton", "test_parameters_in_other_memory_orders", "transposed", "float32", "float32",
           "a column-major parameter, gradients with other strides"),
    # Triton, one kernel at a time against its formula.
    Case(_K + "test_pass1_inner_products[bf16-3]", "triton", "float32", "bfloat16", ("gradient_dots",)),
    Case(_K + "test_coefficients_match_two_loop[4-pair_counts3]", "triton", "float32", "float32", ("two_loop",)),
    Case(_K + "test_pass2_update[pair-forming]", "triton", "float32", "float32", ("update",)),
    Case(_K + "test_pass2_skips_every_write_unless_ok", "triton", "float32", "float32", ("update",)),
    Case(_K + "test_push_writes_pair_gram_and_counters[bf16-3-pair_counts0]", "triton", "float32", "bfloat16",
         ("push",)),
    # The CUDA C++ kernels against the float64 reference (tests/test_parity.py).
    _whole("cuda", "test_matches_reference", "paper-f32-f32-tensor", "float32", "float32",
           "blocks per tensor, the ring wrapped, a skipped pair, non-finite steps"),
    _whole("cuda", "test_matches_reference", "paper-f32-f32-lists", "float32", "float32", "blocks listed by the user"),
    _whole("cuda", "test_matches_reference", "paper-f64-f64-13", "float64", "float64",
           "blocks that cut tensors, every per-element state vector too"),
    *(_whole("cuda", "test_precision_matches_reference", f"{p}-paper", *_PRECISIONS[p])
      for p in ("f32-bf16", "f32-f16", "f64-f32", "f16-f16", "bf16-bf16", "bf16-f32")),
    _whole("cuda", "test_amp_grad_scale_and_found_inf", "paper", "float32", "float32",
           "GradScaler's scale and inf check"),
    _whole("cuda", "test_parameters_in_other_memory_orders", "channels_last", "float32", "float32",
           "channels_last parameters, gradients with other strides"),
)

# What PARITY must cover, per CUDA backend: (parameter dtype, history dtype) pairs, each
# history dtype the kernels take (mlbfgs_fused/backends/native.py, NARROW_HISTORY) at least once.
REQUIRED_DTYPES = (
    ("float32", "float32"), ("float32", "bfloat16"), ("float32", "float16"),
    ("float64", "float64"), ("float64", "float32"),
    ("float16", "float16"), ("bfloat16", "bfloat16"),
)
REQUIRED = {backend: REQUIRED_DTYPES for backend in ("triton", "cuda")}

# CUDA graph capture and replay, pair steps included (in the ``cuda`` selection).
GRAPH = (
    _T + "test_cuda_graph_capture_and_replay",
    _T + "test_captured_steps_replay_bit_for_bit_like_eager[triton]",
    _T + "test_captured_steps_replay_bit_for_bit_like_eager[foreach]",
)

# GPU tests left for the ``rest`` selection: long, and not about the kernels' results
# (Inductor compiles the step: tens of seconds the first time).
LATER = (_T + "test_inductor_compiled_step_matches_eager_on_the_gpu",)

# The ``rest`` selection's order (a cut-off run has run the first): these files first.
REST_FIRST = ("tests/test_parity.py", "tests/test_triton_optimizer.py", "tests/test_triton_kernels.py",
              "tests/test_native.py", "tests/test_optim_conventions.py", "tests/test_amp.py",
              "tests/test_half_precision.py")

PARITY_IDS = tuple(case.nodeid for case in PARITY)


def parity_files() -> list[str]:
    """The test files that hold :data:`PARITY`, in order (what the parity call collects)."""
    return list(dict.fromkeys(nodeid.split("::")[0] for nodeid in PARITY_IDS))


def needs_cuda_to_collect(nodeid: str) -> bool:
    """Ids that exist only where the CUDA C++ kernels run: none (tests/cases.py collects
    every registered backend's cases everywhere, skipped where they cannot run)."""
    return False


def select(mode: str, items: list) -> list:
    """The items of one selection (``cuda``, ``parity`` or ``rest``), in the order they run."""
    parity, later = set(PARITY_IDS), set(LATER)
    if mode == "parity":
        by_id = {item.nodeid: item for item in items}
        return [by_id[nodeid] for nodeid in PARITY_IDS if nodeid in by_id]
    if mode == "cuda":
        return [item for item in items if needs_cuda(item) and item.nodeid not in parity | later]
    if mode == "rest":
        rest = [item for item in items
                if item.nodeid not in parity and (item.nodeid in later or not needs_cuda(item))]

        def rank(item):
            if item.nodeid in later:
                return 0
            path = item.nodeid.split("::")[0]
            slow = len(REST_FIRST) + 1 if item.get_closest_marker("slow") is not None else 0
            return 1 + slow + (REST_FIRST.index(path) if path in REST_FIRST else len(REST_FIRST))

        return sorted(rest, key=rank)  # stable: file order within a rank
    raise ValueError(f"unknown selection {mode!r}")


# -- the pytest plugin -------------------------------------------------------------------
def pytest_addoption(parser):
    group = parser.getgroup("gpu check")
    group.addoption("--check-select", choices=("cuda", "parity", "rest"), default=None,
                    help="run one selection of the GPU check (bench/check_tests.py)")
    group.addoption("--check-report", default=None, help="write the selection and the missing ids as JSON here")
    group.addoption("--check-pretend-cuda", action="store_true",
                    help="collect as if the CUDA C++ kernels ran here (checks the ids; never for running tests)")


def pytest_configure(config):
    if config.getoption("check_pretend_cuda"):
        from mlbfgs_fused.backends import native

        native.cuda.available = lambda: True  # read when tests/cases.py is imported


def pytest_collection_modifyitems(config, items):
    mode = config.getoption("check_select")
    if mode is None:
        return
    keep = select(mode, items)
    kept = {id(item) for item in keep}
    dropped = [item for item in items if id(item) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    report = config.getoption("check_report")
    if report:
        found = {item.nodeid for item in items}
        missing = [nodeid for nodeid in PARITY_IDS if nodeid not in found] if mode == "parity" else []
        Path(report).write_text(json.dumps({"selection": mode, "selected": [item.nodeid for item in items],
                                            "missing": missing}, indent=1))
