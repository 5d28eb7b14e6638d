"""Timing: warm-up first, then the median of individually timed repeats.

On CUDA each repeat is bracketed by CUDA events; on the CPU by ``perf_counter``.
``before_each`` runs outside the timed region (to restore inputs a step overwrites).
"""

from __future__ import annotations

import os
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
    if not times:
        return {}
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "warmup": warmup,
    }


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    repeats: int,
    warmup: int = 1,
    before_each: dict[str, Callable[[], object]] | None = None,
) -> dict[str, dict]:
    """Like :func:`time_calls` for several functions, timed round-robin (one call of
    each per round) so that a slow spell of a shared machine hits them all alike."""
    before_each = before_each or {}
    for name, fn in fns.items():
        time_calls(fn, device, repeats=0, warmup=warmup, before_each=before_each.get(name))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_calls(fn, device, repeats=1, warmup=0, before_each=before_each.get(name))["median_s"])
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "repeats": repeats, "warmup": warmup}
        for name, t in samples.items()
    }


def load_average() -> float | None:
    """The 1-minute load average: how busy the machine was (a busy shared machine times slowly)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


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
