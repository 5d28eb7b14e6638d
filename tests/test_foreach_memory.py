"""Peak memory of every foreach step, pair updates included, with bench/memory.py's
AllocationTracker (every aten op's new storages, alive at once)."""

import pytest
import torch

from bench.memory import AllocationTracker
from mlbfgs_fused import MLBFGS
from mlbfgs_fused.backends import foreach

N = 30_000
M = 4
CHUNK = 4096  # the chunk of the widened paths, shrunk below N so their bound shows


def _step_peaks(dtype=torch.float32, steps=10, **kwargs):
    """Peak bytes and the parameter-sized allocations of each step after the first
    (the first allocates the arena and its scratch); update_period 3, so steps 3, 6, 9
    push pairs and 6 and 9 form them."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in (N // 3, N - N // 3)]
    opt = MLBFGS(params, update_period=3, history_size=M, backend="foreach", **kwargs)
    out = []
    for t in range(1, steps + 1):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        with AllocationTracker() as tracker:
            opt.step()
        large = [(a.op, a.numel) for a in tracker.allocations if a.numel >= 1000]
        if t > 1:
            out.append((tracker.peak_bytes, large))
    assert int(opt.block_states(params[0])[0]["pair_count"]) >= 1
    return out


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"variant": "released"}, {"blocks": "tensor"}, {"capturable": True}, {"maximize": True, "weight_decay": 0.1}],
    ids=["paper", "released", "tensor-blocks", "capturable", "maximize-wd"],
)
def test_float32_steps_allocate_no_parameter_sized_temporary(kwargs):
    """Every step, pair steps included, peaks at a few kilobytes (per-block scalars),
    against 120 kB for one parameter-sized float32 vector."""
    for peak, large in _step_peaks(**kwargs):
        assert large == []
        assert peak < 16 * 1024


def test_amp_unscaling_allocates_nothing_parameter_sized():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(N, generator=gen))
    opt = MLBFGS([p], update_period=2, history_size=M, backend="foreach")
    for t in range(6):
        p.grad = torch.randn(N, generator=gen) * 1024.0
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        with AllocationTracker() as tracker:
            opt.step()
        if t:
            assert tracker.peak_bytes < 16 * 1024
    assert int(opt.block_states(p)[0]["pair_count"]) >= 1


@pytest.mark.parametrize(
    "dtype,kwargs",
    [(torch.float16, {}), (torch.bfloat16, {"variant": "released"}), (torch.float32, {"history_dtype": torch.bfloat16})],
    ids=["float16", "bfloat16-released", "bfloat16-history"],
)
def test_widened_chunks_are_bounded(dtype, kwargs, monkeypatch):
    """16-bit data is widened to float32 in chunks of _CHUNK columns: the scratch is at
    most (m + 2) chunks of float32, whatever N (here N > 7 chunks); a history stored narrower than the
    parameters adds one block-sized row in the history dtype on pair steps."""
    monkeypatch.setattr(foreach, "_CHUNK", CHUNK)
    bound = (M + 2) * CHUNK * 4 + 16 * 1024
    row = N * 2 if "history_dtype" in kwargs else 0
    peaks = _step_peaks(dtype, **kwargs)
    for peak, large in peaks:
        assert peak <= bound + row
        assert all(numel <= M * CHUNK or (row and numel <= N) for _, numel in large)
