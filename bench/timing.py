"""Timing: warm-up first, then the median of individually timed repeats.

On CUDA each repeat is bracketed by CUDA events; on the CPU by ``perf_counter``.
``before_each`` runs outside the timed region (to restore inputs a step overwrites).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    before_each: Callable[[], object] | None = None,
) -> dict:
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "warmup": warmup,
    }


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Bytes read plus written per second by ``dst.copy_(src)`` of a large random tensor:
    the practical memory-bandwidth ceiling every other number is compared with."""
    if nbytes is None:
        nbytes = (1 << 31) if device.type == "cuda" else (1 << 28)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_calls(lambda: dst.copy_(src), device, repeats=repeats, warmup=2)
    moved = 2 * src.numel() * src.element_size()
    return {
        "bytes_per_s": moved / timing["median_s"],
        "tensor_bytes": src.numel() * src.element_size(),
        **timing,
    }
