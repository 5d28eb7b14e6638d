"""The backends a backend-independent test runs on: every registered backend, skipped
with the reason where it cannot run here, so a new backend gets the tests by being
registered (mlbfgs_fused.backends.REGISTRY)."""

from __future__ import annotations

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
