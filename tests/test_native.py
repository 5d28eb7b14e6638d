"""What is the C++ backends' own ("cpp" on the CPU, "cuda" on a GPU): the same bits for any
thread count, no allocation per step, the dispatch to them, the fallback without the
extension, the ops' fake kernels, and the CUDA backend's refusal of graph capture.
Their trajectories against the float64 reference are tests/test_parity.py's.

Skipped, saying why, where the extension ``mlbfgs_fused._C`` was not built.
"""

import pytest
import torch

from bench.memory import AllocationTracker
from mlbfgs_fused import MLBFGS, backends
from mlbfgs_fused.backends import native
from problems import assert_bit_identical, run_scenario, standard_scenario

pytestmark = pytest.mark.skipif(
    native.load_error() is not None, reason=str(native.load_error())
)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_thread_count_does_not_change_the_bits():
    """Chunks do not depend on the thread count, and the partial sums of a block are
    added in chunk order: one thread and two give the same bits (a group large
    enough for several chunks per block)."""
    sc = standard_scenario(3, steps=12)  # blocks of <= 3 elements ... and one big group below
    runs = []
    for n in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            runs.append(_big_run(steps=9))
            runs.append(run_scenario(sc, backend="cpp"))
        finally:
            torch.set_num_threads(before)
    assert_bit_identical(runs[0], runs[2])
    assert_bit_identical(runs[1], runs[3])


def _big_run(steps: int, n: int = 3 * native.CHUNK + 123, **kwargs):
    """A quadratic with several chunks per block, two parameters."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(n - 1000, generator=gen)), torch.nn.Parameter(torch.randn(1000, generator=gen))]
    scale = torch.rand(n, generator=gen) + 0.5
    opt = MLBFGS(params, lr=0.05, history_size=3, update_period=2, ema_decay=(0.9, 0.9), backend="cpp", **kwargs)
    for _ in range(steps):
        theta = torch.cat([p.detach() for p in params])
        g = scale * theta + 0.1 * torch.randn(n, generator=gen)
        for p, chunk in zip(params, g.split([p.numel() for p in params])):
            p.grad = chunk.clone()
        opt.step()
    return opt, [params]


def test_two_runs_are_bit_identical(threads):
    assert_bit_identical(_big_run(steps=9), _big_run(steps=9))


def test_no_allocation_of_size_n_on_any_step():
    """Plain steps and pair-forming steps allocate nothing that grows with N."""
    n = 2 * native.CHUNK + 7
    params = [torch.nn.Parameter(torch.randn(n))]
    opt = MLBFGS(params, history_size=2, update_period=2, backend="cpp")
    for step in range(8):
        params[0].grad = torch.randn(n)
        with AllocationTracker() as tracker:
            opt.step()
        if step >= 1:  # after the first step built the arena and its tables
            assert tracker.peak_bytes < 1024, (step, tracker.allocations)
    assert int(opt.block_states(params[0])[0]["pair_count"]) >= 2


def test_fused_dispatch_on_the_cpu():
    p = torch.nn.Parameter(torch.randn(3))
    for kwargs in (dict(fused=True), dict(backend="cpp"), dict()):
        opt = MLBFGS([p], **kwargs)
        assert backends.select(opt.param_groups[0]).name == "cpp", kwargs
    for kwargs in (dict(fused=False), dict(foreach=True), dict(backend="foreach")):
        opt = MLBFGS([p], **kwargs)
        assert backends.select(opt.param_groups[0]).name == "foreach", kwargs
    p.grad = torch.randn(3)
    opt = MLBFGS([p], fused=True)
    opt.step()
    assert isinstance(opt.backend_plan(0), native.NativePlan)


def test_unavailable_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(native, "load_error", lambda: "not built")
    backends._warn_unavailable.cache_clear()
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="'cpp' backend is not available") as record:
        assert backends.select(MLBFGS([p]).param_groups[0]).name == "foreach"
        assert backends.select(MLBFGS([p]).param_groups[0]).name == "foreach"
    assert len([w for w in record if "not available" in str(w.message)]) == 1
    opt = MLBFGS([p], fused=True)  # checked when the step runs, as torch checks fused=True
    p.grad = torch.randn(3)
    with pytest.raises(RuntimeError, match="`fused=True` on cpu needs the 'cpp' backend, which is not available"):
        opt.step()
    backends._warn_unavailable.cache_clear()


def test_fake_kernels_trace_under_fake_tensors():
    """The ops have fake kernels: a step runs under FakeTensorMode (what torch.compile traces)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    plan_params = [torch.nn.Parameter(torch.randn(10))]
    opt = MLBFGS(plan_params, backend="cpp")
    plan_params[0].grad = torch.randn(10)
    opt.step()
    a = opt.backend_plan(0).arenas[0]
    arena = a.arena
    f, c = arena.flat_state, arena.counters
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (
            arena.history_s, arena.history_y, f["param_ema"], f["grad_ema"], f["param_snapshot"],
            f["grad_snapshot"], a.chunks, c["step"], c["pair_count"], a.partials, a.pair_partials,
        )]
        native.ops().gradient_dots(
            [mode.from_tensor(plan_params[0].detach())], [mode.from_tensor(plan_params[0].grad)],
            *fake, None, 0.0, False, 0.9, 0.9, 0.9, 50, arena.m, True,
        )


def test_cuda_backend_refuses_graph_capture_before_writing(monkeypatch):
    """Its ops upload their pointer tables from pinned host memory freed on return, so a
    captured step would read freed memory on replay: capture is refused up front."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph; use backend='triton'"):
        native.cuda.check_gradients({"params": []})
    native.cpp.check_gradients({"params": [], "variant": "paper", "history_dtype": None})  # CPU: no capture


@pytest.mark.cuda
@pytest.mark.skipif(not native.cuda.available(), reason="needs a CUDA GPU and the CUDA C++ kernels")
def test_cuda_backend_capture_raises_and_leaves_the_state_alone():
    p = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = MLBFGS([p], backend="cuda", lr=torch.tensor(0.1, device="cuda"), capturable=True)
    p.grad = torch.randn_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    weights = p.detach().clone()
    side = torch.cuda.Stream()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        with torch.cuda.stream(side), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=side):
            opt.step()
    torch.testing.assert_close(p.detach(), weights, rtol=0, atol=0)
    for k, v in before.items():
        torch.testing.assert_close(opt.state[p][k], v, rtol=0, atol=0)
