"""What a backend-independent test runs on: every registered backend, skipped with the
reason where it cannot run here (a new backend gets the tests by being registered in
mlbfgs_fused.backends.REGISTRY), and the table of (parameter dtype, history dtype)
precisions with the error each may reach against the float64 reference
(docs/design.md, "Testing").

Tests parametrize over :data:`BACKENDS` (``pytest.param`` per backend name, skipped
with its reason where it cannot run), put their tensors on :func:`backend_device`,
take :data:`PRECISIONS` for the dtypes and :func:`tolerance` for the bound, and call
:func:`require` for what a backend does not do (:data:`LIMITS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mlbfgs_fused import backends


def backend_device(name: str) -> str:
    """The device type a backend's tests put their tensors on."""
    if name == "cuda":
        return "cuda"
    if name == "triton":
        from mlbfgs_fused.backends import triton

        return "cpu" if triton.available() and triton.interpreting() else "cuda"
    if name == "foreach":
        return "cpu"
    return backends.get(name).supported_devices()[0]


def skip_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None."""
    backend = backends.get(name)
    if not backend.available():
        reason = getattr(backend.module, "unavailable_reason", lambda: None)()
        return f"the {name!r} backend is not available here" + (f" ({reason})" if reason else "")
    if backend_device(name) == "cuda" and not torch.cuda.is_available():
        return f"the {name!r} backend needs a CUDA GPU"
    return None


def backend_params(names=None) -> list:
    """``pytest.param`` per backend (all registered ones by default), each skipped with
    its reason where it cannot run here."""
    out = []
    for name in names or backends.names():
        reason = skip_reason(name)
        marks = [pytest.mark.skipif(True, reason=reason)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


BACKENDS = backend_params()


def backend_pair_params(partner: str = "foreach") -> list:
    """``pytest.param(first, second)``: each other backend to ``partner`` and back (a
    checkpoint saved by one, resumed by the other), skipped where it cannot run here."""
    out = []
    for name in backends.names():
        if name == partner:
            continue
        reason = skip_reason(name) or skip_reason(partner)
        marks = [pytest.mark.skipif(True, reason=reason)] if reason else []
        for pair in ((partner, name), (name, partner)):
            out.append(pytest.param(*pair, marks=marks, id="-".join(pair)))
    return out


def interpreted(name: str) -> bool:
    """Whether the backend's kernels run through an interpreter here (Triton's, without a
    GPU: a few milliseconds per program, about a second per step of tests/problems.py's
    scenarios on two cores)."""
    if name != "triton":
        return False
    from mlbfgs_fused.backends import triton

    return triton.available() and triton.interpreting()


def interpreter_runs(backend: str, this_case: bool) -> None:
    """Skip the running test when ``backend`` is interpreted here and this case is not
    among those chosen to run through the interpreter (``this_case``): there a smaller
    set covers each feature once (the whole matrix would take most of an hour), and the
    rest runs where the kernels are compiled (on a GPU, bench/check_tests.py)."""
    if interpreted(backend) and not this_case:
        pytest.skip(f"{backend!r} runs through its interpreter here: a smaller set of these cases runs here, "
                    "all of them where its kernels are compiled")


# -- what a backend does not do ------------------------------------------------------------
# (backend, group key, value) -> the reason, as the backend's own error says it. A case
# that needs one of these skips with the reason (require), and tests/test_parity.py checks
# that the backend does raise.
LIMITS: dict[tuple[str, str, object], str] = {
    ("cuda", "variant", "released"): (
        "variant='released' is not implemented on the 'cuda' backend (NotImplementedError)"
    ),
}


def limit(backend: str, **group) -> str | None:
    """The reason why ``backend`` cannot step a group with these settings, or None."""
    for key, value in group.items():
        reason = LIMITS.get((backend, key, value))
        if reason is not None:
            return reason
    return None


def limit_params() -> list:
    """``pytest.param(backend, key, value)`` per entry of :data:`LIMITS`, skipped where the
    backend cannot run here."""
    out = []
    for (name, key, value), reason in LIMITS.items():
        skip = skip_reason(name)
        marks = [pytest.mark.skipif(True, reason=skip)] if skip else []
        out.append(pytest.param(name, key, value, marks=marks, id=f"{name}-{key}-{value}"))
    return out


def require(backend: str, **group) -> None:
    """Skip the running test, with the reason, when ``backend`` does not take these settings."""
    reason = limit(backend, **group)
    if reason is not None:
        pytest.skip(reason)


# -- precisions ----------------------------------------------------------------------------
_SHORT = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """Parameters of one dtype with the history stored in another (or the same), and the
    relative error of the parameters against the float64 reference that a run of
    tests/test_parity.py may reach: ``tolerance``; ``foreach``, the foreach backend's
    own bound where it was calibrated tighter (16-bit parameters: there a fused backend,
    whose arithmetic is float32, is also held to at most 1.5 times foreach's error on
    the same run); ``released`` under ``variant="released"`` (its averages are sums,
    about ``1 / (1 - beta)`` times the parameters, so a pair ``s = P - P0`` stored in a
    narrow dtype loses that many more of its bits)."""

    param: torch.dtype
    history: torch.dtype
    tolerance: float
    foreach: float | None = None
    released: float | None = None
    why: str = ""

    @property
    def id(self) -> str:
        return f"{_SHORT[self.param]}-{_SHORT[self.history]}"

    @property
    def history_dtype(self) -> torch.dtype | None:
        """The optimizer's ``history_dtype`` argument for this precision."""
        return None if self.history == self.param else self.history

    @property
    def half(self) -> bool:
        """16-bit parameters: every state vector is rounded to 8 or 11 bits."""
        return self.param in HALF


f64, f32, bf16, f16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# Bounds on the scenarios of tests/test_parity.py (16 to 24 steps, pairs pushed and the
# ring wrapped). Measured over 12 seeds of its scenario for the narrow ones (update
# period 4, 24 steps, blocks of 13): the largest error on any backend is in ``why``.
FULL = (
    Precision(f64, f64, 1e-10, why="only the order of summation differs from the reference"),
    Precision(f32, f32, 1e-4, why="float32 rounding over ~20 steps"),
)
NARROW = (
    Precision(f32, bf16, 1e-2, released=5e-2, why="pairs in 8 bits: 1.0e-3; released 2.5e-2"),
    Precision(f32, f16, 5e-3, why="pairs in 11 bits: 1.2e-4; released 2.7e-3"),
    Precision(f64, f32, 1e-6, released=2e-6, why="pairs in 24 bits: 1.5e-8; released 7.4e-7"),
    Precision(f16, f16, 2e-2, foreach=5e-3, why="every state vector in 11 bits: foreach 1.8e-3, cpp 1.4e-3"),
    Precision(bf16, bf16, 5e-2, foreach=3e-2, why="every state vector in 8 bits: foreach 2.1e-2, cpp 1.6e-2"),
    Precision(bf16, f32, 6e-2, foreach=3e-2, why="8-bit state, 24-bit pairs: foreach 2.1e-2, cpp 1.6e-2"),
    Precision(f16, bf16, 3e-2, why="11-bit state, 8-bit pairs: foreach 1.9e-3, cpp 1.5e-3"),
)
PRECISIONS = FULL + NARROW

# Triton's interpreter stores bfloat16 by truncation where a GPU rounds to nearest
# (tests/test_nothing_silently_wrong.py checks the device's rounding), so bfloat16
# parameters drift further from the reference there, each store biased toward zero:
# measured 6.6e-2 over 4 seeds (foreach 1.8e-2).
INTERPRETED_BFLOAT16 = 1.5e-1


def rounds_as_the_device(precision: Precision, backend: str) -> bool:
    """Whether the backend's stores of ``precision.param`` round as the device does here
    (not where Triton's interpreter truncates bfloat16)."""
    return not (precision.param == torch.bfloat16 and interpreted(backend))


def tolerance(precision: Precision, backend: str, variant: str = "paper") -> float:
    """The bound of ``precision`` for ``backend`` and ``variant``: the larger of the entries
    that apply."""
    bounds = [precision.tolerance if backend != "foreach" or precision.foreach is None else precision.foreach]
    if variant == "released" and precision.released is not None:
        bounds.append(precision.released)
    if not rounds_as_the_device(precision, backend):
        bounds.append(INTERPRETED_BFLOAT16)
    return max(bounds)


def precision_params(precisions=PRECISIONS) -> list:
    return [pytest.param(p, id=p.id) for p in precisions]
