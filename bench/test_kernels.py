"""Kernel microbenchmarks: each backend's phases and the whole MLBFGS step over N and m.

Run with ``pytest bench/ --benchmark-only --benchmark-json=FILE`` (``bench.run``
does). Each result's ``extra_info`` holds the floor bytes of what was timed,
the achieved bytes per second and the fraction of the copy bandwidth measured
in the same session.
"""

from __future__ import annotations

import itertools

import torch

from bench.contenders import build_mlbfgs, mlbfgs_backend_works, mlbfgs_floor_bytes
from bench.machine import default_device
from bench.phases import PASS_NAMES, backend_phases
from bench.problem import make_history, make_problem
from bench.timing import synchronize

HISTORY_SIZES = (5, 10, 20)
SMOKE_CASES = [(2048, 2)]


def _sizes(config) -> list[int]:
    cap = config.getoption("--bench-max-n")
    if cap is None:
        cap = 1e8 if torch.cuda.is_available() else 1e7
    return [n for n in (10**5, 10**6, 10**7, 10**8) if n <= cap]


def _backends() -> list[str]:
    device = default_device()
    # The Triton interpreter is far too slow to time: Triton only on CUDA.
    candidates = ["triton", "cuda", "foreach"] if device.type == "cuda" else ["cpp", "foreach"]
    return [b for b in candidates if mlbfgs_backend_works(b, device)]


def _rounds(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 20
    return {10**5: 30, 10**6: 10}.get(n, 5)


def pytest_generate_tests(metafunc):
    smoke = metafunc.config.getoption("--bench-smoke")
    cases = SMOKE_CASES if smoke else list(itertools.product(_sizes(metafunc.config), HISTORY_SIZES))
    if "kernel_case" in metafunc.fixturenames:
        # (backend, N, m, kernel), grouped by (backend, N, m) so one optimizer serves all its kernels
        params = [
            (b, n, m, k)
            for b in _backends()
            for n, m in cases
            for k in ("step", *PASS_NAMES)
        ]
        metafunc.parametrize(
            "kernel_case", params, ids=[f"{b}-N{n:.0e}-m{m}-{k}".replace("+0", "") for b, n, m, k in params]
        )
    if "copy_numel" in metafunc.fixturenames:
        sizes = [n for n, _ in cases[:1]] if smoke else _sizes(metafunc.config)
        metafunc.parametrize("copy_numel", sorted(set(sizes)), ids=lambda n: f"N{n:.0e}".replace("+0", ""))


_built: dict = {}


def _optimizer(backend: str, n: int, m: int, device: torch.device):
    """One optimizer at a time (the largest hold GBs), rebuilt when the case changes."""
    key = (backend, n, m)
    if key not in _built:
        _built.clear()
        problem = make_problem(n, device)
        params = problem.fresh_params()
        opt = build_mlbfgs(backend)(params, make_history(n, m, device))
        _built[key] = opt
    return _built[key]


def _record(benchmark, floor_bytes: int, bandwidth: dict) -> None:
    benchmark.extra_info["floor_bytes"] = floor_bytes
    benchmark.extra_info["copy_bandwidth_bytes_per_s"] = bandwidth["bytes_per_s"]
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median = stats.stats.median
        benchmark.extra_info["bytes_per_s"] = floor_bytes / median
        benchmark.extra_info["fraction_of_copy_bandwidth"] = floor_bytes / median / bandwidth["bytes_per_s"]


def test_copy(benchmark, copy_numel, device, bandwidth, smoke):
    """Copy bandwidth at each N, the ceiling the kernels at that N are held to."""
    src = torch.randn(copy_numel, device=device)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        synchronize(device)

    benchmark.extra_info.update(kernel="copy", n=copy_numel, m=0, backend="torch")
    benchmark.pedantic(run, rounds=2 if smoke else 3 * _rounds(copy_numel, device), warmup_rounds=1)
    _record(benchmark, 8 * copy_numel, bandwidth)


def test_mlbfgs(benchmark, kernel_case, device, bandwidth, smoke):
    backend, n, m, kernel = kernel_case
    opt = _optimizer(backend, n, m, device)
    if kernel == "step":
        fn, floor = opt.step, mlbfgs_floor_bytes(n, m)
    else:
        phase, floor_of = backend_phases(opt, m)[kernel]
        fn, floor = phase, floor_of(n)

    def run():
        fn()
        synchronize(device)

    benchmark.group = f"{backend} N={n:.0e} m={m}"
    benchmark.extra_info.update(kernel=kernel, n=n, m=m, backend=backend)
    benchmark.pedantic(run, rounds=2 if smoke else _rounds(n, device), warmup_rounds=1)
    _record(benchmark, floor, bandwidth)
    assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])
