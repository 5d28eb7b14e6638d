"""The C++ backend's whole step as one call (``mlbfgs_fused._C.whole_step``, csrc/python.cpp)
and its pair pushed inside pass 2: against the passes one by one (the same bits), against
the float64 reference, and where it must step aside (nothing written, the general path's
errors and rebuilds)."""

import pytest
import torch

from mlbfgs_fused import MLBFGS
from mlbfgs_fused.backends import native
from problems import Scenario, assert_bit_identical, build_params, flat, run_against_reference, set_grads

pytestmark = pytest.mark.skipif(native.load_error() is not None, reason=str(native.load_error()))


def _one_group(blocks="group", steps=30, seed=3, nan_steps=(), absent=None, **overrides):
    """One group of odd shapes (a single arena: the one-call step applies), a short update
    period so pairs form, are damped, skipped and wrap the ring of 3. (Blocks of several
    chunks, one thread against two: test_native.py's _big_run, also one call.)"""
    hyper = dict(lr=0.05, weight_decay=0.01, history_size=3, update_period=3, ema_decay=(0.9, 0.95),
                 pair_momentum=0.5, blocks=blocks)
    hyper.update(overrides)
    return Scenario(shapes=[[(7, 3), (5,), (2, 3, 2), (300,)]], hyper=[hyper], steps=steps, seed=seed,
                    absent=absent or {}, nan_steps=nan_steps)


class _Counted:
    """``_C.whole_step`` counting the steps it took."""

    def __init__(self, fn):
        self.fn, self.taken = fn, 0

    def __call__(self, *args):
        done = self.fn(*args)
        self.taken += bool(done)
        return done


@pytest.fixture(autouse=True)
def counted(monkeypatch):
    wrapper = _Counted(native._whole_step)
    monkeypatch.setattr(native, "_whole_step", wrapper)
    return wrapper


def _run(sc, single: bool, dtype=torch.float32, amp=None, **kwargs):
    """Run ``sc`` on the C++ backend, through the one call (``single``) or the passes one by
    one (the plan told it cannot). ``amp(step)`` gives (grad_scale, found_inf) or None.
    Returns the run and the number of steps the one call took."""
    groups = build_params(sc, dtype)
    opt = MLBFGS([{"params": params, **h} for params, h in zip(groups, sc.hyper)], backend="cpp", **kwargs)
    taken = native._whole_step.taken
    for step in range(sc.steps):
        set_grads(sc, groups, step)
        if amp is not None and amp(step) is not None:
            scale, found_inf = amp(step)
            for p in groups[0]:
                if p.grad is not None:
                    p.grad.mul_(scale)
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(found_inf)
        elif amp is not None:
            opt.grad_scale = opt.found_inf = None
        if not single and opt._arenas:
            opt.backend_plan(0).single_call = False
        opt.step()
    return (opt, groups), native._whole_step.taken - taken


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(blocks="tensor"),
        dict(blocks=13, maximize=True, normalize=True),
        dict(history_dtype=torch.bfloat16),
        dict(history_dtype=torch.float16, weight_decay=0.0, normalize=False),
        dict(dtype=torch.bfloat16),
        dict(dtype=torch.float16, history_dtype=torch.float32),
        dict(dtype=torch.float64, history_dtype=torch.bfloat16),
        dict(absent={(0, 1): range(0, 8), (0, 3): range(10, 13)}, nan_steps=(5, 17)),
        dict(amp=True),
    ],
    ids=["float32", "tensor", "chunks-maximize", "bf16-history", "fp16-history", "bf16", "fp16",
         "float64-bf16-history", "absent-nan", "amp"],
)
def test_single_call_is_the_passes_to_the_bit(case, threads):
    """Every feature through the one call equals the same run through the passes one by one,
    pairs pushed inside pass 2 included, for 1 and 2 threads."""
    case = dict(case)
    dtype = case.pop("dtype", torch.float32)
    history_dtype = case.pop("history_dtype", None)
    amp = None
    if case.pop("amp", False):
        amp = lambda step: (1024.0, 1.0 if step == 7 else 0.0) if step % 2 else None  # noqa: E731
    sc = _one_group(**case)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        single, calls = _run(sc, True, dtype, amp, history_dtype=history_dtype)
        passes, none = _run(sc, False, dtype, amp, history_dtype=history_dtype)
    finally:
        torch.set_num_threads(before)
    assert calls == sc.steps - 1 and none == 0  # the first step builds the arena
    assert_bit_identical(single, passes)
    blocks = [b for p in single[1][0] for b in single[0].block_states(p)]
    assert sum(int(b["pair_count"]) for b in blocks) > 0


@pytest.mark.parametrize("history_dtype,tol", [(None, 1e-4), (torch.bfloat16, 1e-2)])
def test_single_call_matches_the_reference(history_dtype, tol):
    sc = _one_group(steps=40, absent={(0, 2): range(0, 5)}, nan_steps=(11,))
    opt, groups, _, errors = run_against_reference(sc, backend="cpp", history_dtype=history_dtype)
    assert native._whole_step.taken == sc.steps - 1
    assert errors[0] < tol, errors
    pairs = [int(b["pair_count"]) for p in groups[0] for b in opt.block_states(p)]
    assert sum(pairs) >= 3


def _stepped(n=3):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = MLBFGS(params, backend="cpp", update_period=2, history_size=2)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert opt._single is not None
    return params, opt


def _state(opt, params):
    return [p.detach().clone() for p in params] + [
        v.clone() for p in params for k, v in sorted(opt.state[p].items()) if k != "blocks"
    ]


@pytest.mark.parametrize("bad", ["dtype", "shape", "sparse"])
def test_a_gradient_it_cannot_take_raises_the_general_error_and_writes_nothing(bad):
    params, opt = _stepped()
    before = _state(opt, params)
    params[1].grad = torch.randn(5)
    params[0].grad = torch.randn(4, 3)
    if bad == "dtype":  # autograd never makes these
        params[0].grad.data = torch.randn(4, 3, dtype=torch.float64)
        match = "different type"
    elif bad == "shape":
        params[0].grad.data = torch.randn(3, 4)
        match = "gradient has shape"
    else:
        params[0].grad = torch.randn(4, 3).to_sparse()
        match = "sparse gradients"
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    for a, b in zip(before, _state(opt, params)):
        assert torch.equal(a, b)


def test_a_changed_memory_format_rebuilds_and_steps_in_one_call_again():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = MLBFGS(conv.parameters(), backend="cpp", update_period=2, history_size=2)
    twin = torch.nn.Conv2d(3, 4, 3)
    twin.load_state_dict(conv.state_dict())
    opt_twin = MLBFGS(twin.parameters(), backend="cpp", update_period=2, history_size=2)
    grads = [[torch.randn_like(p) for p in conv.parameters()] for _ in range(8)]
    for i, gs in enumerate(grads):
        if i == 3:
            conv.to(memory_format=torch.channels_last)
        for p, q, g in zip(conv.parameters(), twin.parameters(), gs):
            p.grad = g.clone().to(memory_format=torch.channels_last) if p.dim() == 4 and i >= 3 else g.clone()
            q.grad = g.clone()
        opt.step()
        opt_twin.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt._single is not None  # the rebuilt arena steps in one call
    for p, q in zip(conv.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_a_gradient_in_another_layout_takes_the_passes():
    """A contiguous parameter with a transposed gradient: staged by the passes, the same
    values as a contiguous gradient."""
    results = []
    for transposed in (False, True):
        torch.manual_seed(2)
        w = torch.nn.Parameter(torch.randn(6, 5))
        opt = MLBFGS([w], backend="cpp", update_period=2, history_size=2)
        for _ in range(6):
            g = torch.randn(6, 5)
            w.grad = g.t().contiguous().t() if transposed else g
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_no_gradient_is_no_step():
    params, opt = _stepped()
    before = _state(opt, params)
    for p in params:
        p.grad = None
    opt.step()
    for a, b in zip(before, _state(opt, params)):
        assert torch.equal(a, b)


def test_schedulers_and_a_tensor_lr_are_read_at_every_step():
    runs = []
    for lr in (0.1, torch.tensor(0.1)):
        torch.manual_seed(3)
        p = torch.nn.Parameter(torch.randn(50))
        opt = MLBFGS([p], backend="cpp", lr=lr, update_period=2, history_size=2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(7):
            p.grad = torch.randn(50)
            opt.step()
            sched.step()
        opt.param_groups[0]["momentum"] = 0.3  # a hyperparameter changed by hand
        p.grad = torch.randn(50)
        opt.step()
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)


def _crafted(n: int, gen: torch.Generator) -> torch.Tensor:
    """float32 values whose low 16 bits are rounding ties, near ties and ordinary bits."""
    base = torch.randint(0x3E000000, 0x41000000, (n,), generator=gen, dtype=torch.int64)
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x18000, 0x0000, 0x1000, 0xFFFF], dtype=torch.int64)
    bits = (base & ~0xFFFF) | low[torch.arange(n) % len(low)]
    bits[::3] |= 0x80000000
    return bits.to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("history_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups", [1, 2], ids=["one-call", "passes"])
def test_rows_as_stored_round_as_torch_rounds(history_dtype, groups):
    """A pair whose s and yhat are the parameters themselves (snapshots zero, no averaging,
    no pair momentum, y = s): the ring rows are the parameters rounded to the history dtype
    exactly as ``Tensor.to`` rounds them (ties to even), whole vectors and a parameter's tail."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(_crafted(n, gen)) for n in (64, 67)]
    split = [{"params": params}] if groups == 1 else [{"params": params[:1]}, {"params": params[1:]}]
    opt = MLBFGS(split, history_dtype=history_dtype, ema_decay=(0.0, 0.0), pair_momentum=0.0,
                 update_period=1, history_size=2, backend="cpp", lr=1e-30, momentum=0.0)
    for p in params:
        p.grad = p.detach().clone()
    opt.step()  # the first snapshots
    for p in params:
        opt.state[p]["param_snapshot"].zero_()
        opt.state[p]["grad_snapshot"].zero_()
        p.grad = p.detach().clone()
    want = [p.detach().clone() for p in params]
    opt.step()  # s = theta - 0, y = g - 0 = s, so yhat = s
    pairs = [(params[0], torch.cat(want))] if groups == 1 else list(zip(params, want))
    for p, w in pairs:
        block = opt.block_states(p)[0]
        assert int(block["pair_count"]) == 1
        expected = w.to(history_dtype).view(torch.int16)
        assert torch.equal(block["history_s"][0].view(torch.int16), expected)
        assert torch.equal(block["history_y"][0].view(torch.int16), expected)
        # The Gram matrices are those of the rows as stored.
        row = block["history_s"][0].double()
        torch.testing.assert_close(block["gram"][0, 0, 0], row @ row, rtol=1e-6, atol=0)
