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
    catch: tuple[type[BaseException], ...] = (),
    on_error: Callable[[str, BaseException], object] | None = None,
) -> dict[str, dict]:
    """Like :func:`time_calls` for several functions, timed round-robin (one call of
    each per round) so that a slow spell of a shared machine hits them all alike.
    A function that raises one of ``catch`` is reported to ``on_error`` and dropped;
    the others go on (the result leaves it out)."""
    before_each = before_each or {}
    live = list(fns)

    def attempt(name, **kwargs) -> dict | None:
        try:
            return time_calls(fns[name], device, before_each=before_each.get(name), **kwargs)
        except catch as exc:
            if on_error is None:
                raise
            on_error(name, exc)
            live.remove(name)
            return None

    for name in list(live):
        attempt(name, repeats=0, warmup=warmup)
    samples: dict[str, list[float]] = {name: [] for name in live}
    for _ in range(repeats):
        for name in list(live):
            timing = attempt(name, repeats=1, warmup=0)
            if timing is not None:
                samples[name].append(timing["median_s"])
    return {
        name: {"median_s": statistics.median(samples[name]), "min_s": min(samples[name]),
               "max_s": max(samples[name]), "repeats": repeats, "warmup": warmup}
        for name in live if samples[name]
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
