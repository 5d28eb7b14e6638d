"""pytest plugin: keep only the tests that need a CUDA GPU (``-p bench.cuda_only``).

A test counts as CUDA-only when it carries the ``cuda`` marker, or a ``skipif``
mark whose reason names CUDA or a GPU (``pytest.mark.skipif(not
torch.cuda.is_available(), reason="needs a CUDA GPU")``). ``bench.gpu_validate``
runs these first, on their own, so that a GPU's most telling tests report early.
"""

from __future__ import annotations

import re

_GPU_REASON = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def needs_cuda(item) -> bool:
    if item.get_closest_marker("cuda") is not None:
        return True
    return any(
        _GPU_REASON.search(str(mark.kwargs.get("reason", "")))
        for mark in item.iter_markers(name="skipif")
    )


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if needs_cuda(item)]
    dropped = [item for item in items if not needs_cuda(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
