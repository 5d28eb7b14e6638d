"""The C++ backend ("cpp") against the float64 reference and the other backends.

Skipped, saying why, where the extension ``mlbfgs_fused._C`` was not built.
The CUDA C++ kernels share these scenarios on a GPU (``backend="cuda"``).
"""


import pytest
import torch

from bench.memory import AllocationTracker
from mlbfgs_fused import MLBFGS, backends
from mlbfgs_fused.backends import native
from problems import (
    assert_bit_identical,
    build_params,
    flat,
    make_optimizer,
    resume_from_checkpoint,
    run_against_reference,
    run_optimizer,
    run_scenario,
    set_grads,
    standard_scenario,
)

pytestmark = pytest.mark.skipif(
    native.load_error() is not None, reason=str(native.load_error())
)

DEVICES = ["cpu"] + (["cuda"] if native.cuda.available() else [])
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
BLOCK_MODES = ["group", "tensor", 13, [[0, 2], [1]]]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _scenario(blocks, steps=40, **overrides):
    sc = standard_scenario(blocks, steps=steps, seed=hash(str(blocks)) % 1000, **overrides)
    if isinstance(blocks, list):  # indices of group 0; group 1 keeps one block per tensor
        sc.hyper[1]["blocks"] = [[0], [1]]
    return sc


def _counters(opt, groups):
    return [
        (int(b["pair_count"]), int(b["skipped_pairs"]))
        for params in groups
        for p in params
        for b in opt.state[p].get("blocks", [])
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks", BLOCK_MODES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_matches_reference(blocks, dtype, tol, device, threads):
    sc = _scenario(blocks)
    opt, groups, ref, errors = run_against_reference(sc, dtype, device, backend=BACKEND[device])
    assert max(errors) < tol
    # The scenario exercises what it claims: wrapped histories, damping, skipped pairs.
    blocks_ref = [b for g in ref.groups for b in g.blocks]
    assert max(len(b.pairs) for b in blocks_ref) == 3
    assert sum(b.damped_pairs for b in blocks_ref) > 0
    ref_counts = [
        (g.t // g.h["update_period"] - 1 - b.skipped_pairs, b.skipped_pairs)
        for g in ref.groups
        for b in g.blocks
    ]
    assert _counters(opt, groups) == ref_counts
    assert max(c for c, _ in ref_counts) > 3  # the ring wrapped
    if blocks == "tensor":
        assert sum(s for _, s in ref_counts) >= 1


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_flags_match_reference(normalize, maximize):
    sc = _scenario("tensor", steps=24, normalize=normalize, maximize=maximize)
    _, _, _, errors = run_against_reference(sc, torch.float64, backend="cpp")
    assert max(errors) < 1e-10


def test_non_finite_steps_change_nothing_but_the_counters(threads):
    sc = _scenario("tensor")
    sc.nan_steps = (5, 14, 15)
    opt, groups, ref, errors = run_against_reference(sc, torch.float64, backend="cpp")
    assert max(errors) < 1e-10
    block = opt.state[groups[0][0]]["blocks"][0]
    assert int(block["skipped_steps"]) == 3 and int(block["step"]) == 37
    assert ref.groups[0].skipped_steps == 3


@pytest.mark.parametrize("history", [torch.bfloat16, torch.float16])
def test_narrow_history_close_to_reference(history):
    sc = _scenario("group")
    opt, groups, _, errors = run_against_reference(sc, torch.float32, backend="cpp", history_dtype=history)
    assert max(errors) < 1e-2
    assert opt.state[groups[0][0]]["blocks"][0]["history_s"].dtype == history


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters(dtype):
    """16-bit parameters: float32 arithmetic, results rounded on store. Against the
    reference (which runs in float64 from the same rounded start) and the foreach
    backend, whose arithmetic is 16-bit; the C++ step must be at least as close."""
    sc = _scenario(13, steps=24, normalize=True)
    opt, groups, _, errors = run_against_reference(sc, dtype, backend="cpp")
    _, _, _, errors_foreach = run_against_reference(sc, dtype, backend="foreach")
    assert max(errors) < 3e-2
    assert max(errors) <= max(errors_foreach) * 1.5
    assert groups[0][0].dtype == dtype
    assert opt.state[groups[0][0]]["param_ema"].dtype == dtype


def test_float64_parameters_with_float32_history():
    sc = _scenario("tensor")
    opt, groups, _, errors = run_against_reference(sc, torch.float64, backend="cpp", history_dtype=torch.float32)
    assert max(errors) < 1e-4


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


def test_resume_bit_exact_on_the_same_backend():
    sc = _scenario("tensor", steps=30)
    run1, run2 = resume_from_checkpoint(sc, 13, "cpp", "cpp")
    assert_bit_identical(run1, run2)


@pytest.mark.parametrize("first,second", [("foreach", "cpp"), ("cpp", "foreach")])
def test_resume_across_backends(first, second):
    sc = _scenario(13, steps=30)
    (opt, groups), (opt2, groups2) = resume_from_checkpoint(sc, 13, first, second)
    for g1, g2 in zip(groups, groups2):
        torch.testing.assert_close(flat(g2), flat(g1), rtol=1e-4, atol=1e-5)
    assert _counters(opt, groups) == _counters(opt2, groups2)


def test_matches_foreach_step_by_step():
    """Every state tensor after each of 20 steps, float64: the two backends agree."""
    sc = _scenario("tensor", steps=20)
    runs = [run_scenario(sc, torch.float64, backend=name) for name in ("foreach", "cpp")]
    from problems import state_tensors

    for a, b in zip(state_tensors(runs[0][0]), state_tensors(runs[1][0])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


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
    assert int(opt.state[params[0]]["blocks"][0]["pair_count"]) >= 2


def test_amp_grad_scale_and_found_inf():
    """GradScaler's protocol: gradients still scaled (a power of two: unscaling is
    exact, so the bits match the unscaled run) and found_inf skipping the step."""
    sc = _scenario("group", steps=16)
    plain, groups = run_scenario(sc, backend="cpp")
    groups2 = build_params(sc)
    opt = make_optimizer(sc, groups2, backend="cpp")
    for step in range(sc.steps):
        set_grads(sc, groups2, step)
        for params in groups2:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(1024.0)
        opt.grad_scale = torch.tensor(1024.0)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
    assert_bit_identical((plain, groups), (opt, groups2))
    before = [p.detach().clone() for p in groups2[0]]
    set_grads(sc, groups2, 0)
    opt.found_inf = torch.tensor(2.0)  # a sum over devices
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, groups2[0]))
    assert int(opt.state[groups2[0][0]]["blocks"][0]["skipped_steps"]) == 1


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "strided"])
def test_parameters_in_other_memory_orders(layout):
    """A dense parameter in another memory order is stepped in place in its memory
    order (the arena's order for it, on every backend); a non-dense one through a
    contiguous copy. Same result and state as the foreach backend on the same layout."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 3, 5, 2, generator=gen)
    if layout == "transposed":
        make = lambda t: t.reshape(12, 10).t()  # noqa: E731
    elif layout == "channels_last":
        make = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    else:
        make = lambda t: torch.stack([t, t], dim=-1)[..., 0]  # noqa: E731 -- every other element
    runs = {}
    for name in ("foreach", "cpp"):
        x = make(base.clone())
        p = torch.nn.Parameter(x)
        assert not p.is_contiguous()
        opt = MLBFGS([p], lr=0.1, history_size=2, update_period=2, backend=name)
        noise = torch.Generator().manual_seed(1)
        for step in range(7):
            g = torch.randn(p.shape, generator=noise)
            p.grad = g if step % 2 else g.t().contiguous().t() if g.dim() == 2 else g
            opt.step()
        runs[name] = (p, opt)
    (p1, o1), (p2, o2) = runs["foreach"], runs["cpp"]
    assert p2.stride() == p1.stride()
    torch.testing.assert_close(p2.detach(), p1.detach(), rtol=1e-5, atol=1e-6)
    for key in ("momentum_buffer", "param_ema", "grad_snapshot"):
        torch.testing.assert_close(o2.state[p2][key], o1.state[p1][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", ["group", "tensor", 13], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_released_variant_matches_reference(blocks, dtype, tol):
    sc = standard_scenario(blocks, steps=40, seed=11, variant="released")
    sc.nan_steps = (6, 23)
    opt, groups, ref, errors = run_against_reference(sc, dtype, backend="cpp")
    assert max(errors) < tol
    ref_counts = [
        (g.t // g.h["update_period"] - 1 - b.skipped_pairs, b.skipped_pairs)
        for g in ref.groups
        for b in g.blocks
    ]
    assert _counters(opt, groups) == ref_counts
    assert max(c for c, _ in ref_counts) > 3


def test_released_variant_resumes_across_backends():
    sc = standard_scenario("tensor", steps=30, seed=5, variant="released")
    (opt, groups), (opt2, groups2) = resume_from_checkpoint(sc, 12, "cpp", "foreach")
    for g1, g2 in zip(groups, groups2):
        torch.testing.assert_close(flat(g2), flat(g1), rtol=1e-4, atol=1e-5)


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


def test_group_over_two_dtypes_normalises_over_the_whole_group():
    """A group with float32 and float64 parameters has two arenas; ||d|| is the group's."""
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(50, generator=gen), torch.randn(7, 3, generator=gen, dtype=torch.float64)]
    runs = {}
    for name in ("foreach", "cpp"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = MLBFGS(params, lr=0.05, history_size=2, update_period=3, ema_decay=(0.9, 0.9),
                     blocks="tensor", backend=name)
        noise = torch.Generator().manual_seed(4)
        for _ in range(14):
            for p in params:
                p.grad = (2 * p.detach() + 0.1 * torch.randn(p.shape, generator=noise, dtype=p.dtype))
            opt.step()
        runs[name] = params
    for a, b in zip(runs["foreach"], runs["cpp"]):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-5, atol=1e-6)
    assert len(opt.backend_plan(0).arenas) == 2


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
