"""LBFGS with bounds (L-BFGS-B): against ``scipy.optimize.minimize(method="L-BFGS-B")`` with the
same ``maxcor`` and against the float64 reference (mlbfgs_fused/reference/lbfgsb.py), on the
backends; its pieces (chunks, groups, dtypes), its errors, its checkpoints, and nothing
changed without bounds.

``python tests/test_lbfgs_bounds.py`` prints the per-problem comparison with scipy.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from cases import backend_params, skip_reason
from mlbfgs_fused import LBFGS, MLBFGS, _bounds
from mlbfgs_fused.reference import minimize_lbfgsb
from mlbfgs_fused.reference.lbfgsb import projected_gradient
from test_lbfgs import _HostReads
from test_lbfgsb_reference import PROBLEMS as ALL_PROBLEMS

F64 = torch.float64
INF = math.inf
# The six problems (test_lbfgsb_reference.py builds them): each binds some bounds;
# nonnegative_least_squares has lower bounds only, upper_bounds_only upper bounds only.
SCIPY_PROBLEMS = ["bounded_rosenbrock", "nonnegative_least_squares", "box_quadratic", "logistic_in_a_box",
                  "upper_bounds_only", "infeasible_start"]
# scipy's gtol and ftol (= factr * eps), the same for every run: tight enough that the runs
# end at the optimum to far better than 1e-6, loose enough that none ends on steps of rounding
# noise (a decrease of 10 eps |f|), so that all take the same steps to the end. Non-negative
# least squares (condition 1e4) takes factr = 1: at 10 its projected gradient stops near 1e-5.
PGTOL = 1e-6
EPS = float(np.finfo(float).eps)


def _factr(name: str) -> float:
    return 1.0 if name == "nonnegative_least_squares" else 10.0


FTOL = _factr("") * EPS


@pytest.fixture(autouse=True)
def _one_thread():
    """Problems of at most a few hundred variables: threads only add synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _problem(name):
    return ALL_PROBLEMS[name]()


@functools.lru_cache(maxsize=None)
def _scipy(name):
    fg, x0, lower, upper, m = _problem(name)

    def fun(x):
        f, g = fg(torch.from_numpy(x.copy()))
        return f, g.numpy()

    bounds = [(None if math.isinf(lo) else lo, None if math.isinf(hi) else hi)
              for lo, hi in zip(lower.tolist(), upper.tolist())]
    return scipy.optimize.minimize(fun, x0.numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
                                   options=dict(maxcor=m, gtol=PGTOL, ftol=_factr(name) * EPS, maxiter=15000,
                                                maxfun=15000))


def _run(name, backend="foreach", shape=None, dtype=F64, **kwargs):
    """LBFGS on a problem of test_lbfgsb_reference.py: one parameter (of ``shape``), its bounds
    as tensors of that shape, one step to convergence. Returns (x flat, losses evaluated, optimizer)."""
    fg, x0, lower, upper, m = _problem(name)
    shape = shape or x0.shape
    x = x0.clone().to(dtype).reshape(shape).requires_grad_()
    losses = []

    def closure():
        f, g = fg(x.detach().flatten().double())
        losses.append(f)
        x.grad = g.to(dtype).reshape(shape)
        return torch.tensor(f, dtype=dtype)

    settings = dict(history_size=m, max_iter=15000, max_eval=15000, tolerance_grad=PGTOL,
                    tolerance_change=_factr(name) * EPS,
                    backend=backend)
    settings.update(kwargs)
    opt = LBFGS([x], bounds=(lower.to(dtype).reshape(shape), upper.to(dtype).reshape(shape)), **settings)
    opt.step(closure)
    return x.detach().flatten().double(), losses, opt


def _summary(name, backend="foreach"):
    fg, _, lower, upper, _ = _problem(name)
    x, losses, _ = _run(name, backend)
    f, g = fg(x)
    theirs = _scipy(name)
    return dict(
        feasible=bool(((x >= lower) & (x <= upper)).all()),
        objective=abs(f - theirs.fun) / abs(theirs.fun),
        projected_gradient=float(projected_gradient(x, g, lower, upper).abs().max()),
        evals=len(losses), scipy_evals=theirs.nfev, binding=int(((x == lower) | (x == upper)).sum()),
    )


# -- against scipy and the reference -----------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params(["foreach", "cpp"]))
@pytest.mark.parametrize("name", SCIPY_PROBLEMS)
def test_against_scipy(name, backend):
    r = _summary(name, backend)
    assert _scipy(name).message.startswith("CONVERGENCE")
    assert r["feasible"]
    assert r["objective"] <= 1e-6
    assert r["projected_gradient"] < 1e-5
    assert r["evals"] <= 1.5 * r["scipy_evals"], r
    assert r["binding"] > 0, "the bounds must bind for the problem to test them"


@pytest.mark.parametrize("backend", backend_params(["triton"]))
def test_against_scipy_through_triton(backend):
    r = _summary("box_quadratic", backend)
    assert r["feasible"] and r["objective"] <= 1e-6 and r["projected_gradient"] < 1e-5
    assert r["evals"] <= 1.5 * r["scipy_evals"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("backend", ["foreach", "triton", "cuda"])
def test_on_a_gpu(backend, monkeypatch):
    """On CUDA tensors: the CPU's run (the Cauchy point's search without a host read), and no
    read of a scalar beyond the closure's own."""
    if skip_reason(backend):
        pytest.skip(skip_reason(backend))
    name = "box_quadratic"
    fg, x0, lower, upper, m = _problem(name)
    monkeypatch.setattr(_bounds, "CPU_SHORTCUTS", False)
    on_cpu, cpu_losses, _ = _run(name)
    x = x0.cuda().requires_grad_()
    losses = []

    def closure():
        f, g = fg(x.detach().cpu())
        losses.append(f)
        x.grad = g.cuda()
        return torch.tensor(f, dtype=F64, device="cuda")

    opt = LBFGS([x], bounds=(lower.cuda(), upper.cuda()), history_size=m, max_iter=15000, max_eval=15000,
                tolerance_grad=PGTOL, tolerance_change=FTOL, backend=backend)
    opt.step(closure)
    assert len(losses) == len(cpu_losses)
    torch.testing.assert_close(x.detach().cpu(), on_cpu, rtol=0, atol=1e-9)
    r = _scipy(name)
    assert abs(fg(x.detach().cpu())[0] - r.fun) <= 1e-6 * abs(r.fun)


@pytest.mark.parametrize("name", SCIPY_PROBLEMS + ["unbounded", "negative_curvature", "ramp_past_the_box"])
def test_follows_the_float64_reference(name):
    """The same algorithm: the same losses, evaluation by evaluation, to rounding, and the same end."""
    fg, x0, lower, upper, m = _problem(name)
    ref_losses = []

    def recorded(x):
        f, g = fg(x)
        ref_losses.append(f)
        return f, g

    ref = minimize_lbfgsb(recorded, x0, lower, upper, m=m, pgtol=PGTOL, factr=_factr(name))
    x, losses, opt = _run(name, shape=(x0.numel(),) if name != "box_quadratic" else (10, 10))
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert state["func_evals"] == len(losses)
    # Over a hundred evaluations rounding (the ring products are summed in another order)
    # may tip a line search's test the other way (nonnegative_least_squares, unbounded); the
    # first 40 losses and the ends agree.
    first = min(40, len(ref_losses))
    assert losses[:first] == pytest.approx(ref_losses[:first], rel=1e-9, abs=1e-12)
    assert fg(x)[0] == pytest.approx(ref.f, rel=1e-9, abs=1e-12)
    assert abs(len(losses) - ref.n_eval) <= 0.1 * ref.n_eval
    assert abs(state["n_iter"] - ref.n_iter) <= 0.1 * ref.n_iter
    if ref.n_eval < 100:
        assert len(losses) == ref.n_eval and state["n_iter"] == ref.n_iter
        torch.testing.assert_close(x, ref.x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("cpu_shortcuts", [True, False])
def test_pieces_chunks_and_groups_equal_the_whole(monkeypatch, cpu_shortcuts):
    """The variables split over three groups (one parameter each, tensor bounds, one of them of
    another shape), the breakpoint sums and ring products in chunks of a few, the Cauchy point
    searched among the nearest 9 breakpoints first (or, as on a GPU, everywhere at once): the
    same run."""
    name = "infeasible_start"
    monkeypatch.setattr(_bounds, "CPU_SHORTCUTS", cpu_shortcuts)
    fg, x0, lower, upper, m = _problem(name)
    whole, whole_losses, _ = _run(name)
    monkeypatch.setattr(_bounds, "_CHUNK", 7)
    monkeypatch.setattr(_bounds, "_GCP_CHUNK", 5)
    monkeypatch.setattr(_bounds, "_FIRST_CHUNK", 2)
    monkeypatch.setattr(_bounds, "_HEAD", 9)
    cuts = [0, 17, 41, x0.numel()]
    parts = [x0[a:b].clone().requires_grad_() for a, b in zip(cuts, cuts[1:])]
    parts[1] = parts[1].detach().reshape(4, 6).requires_grad_()
    losses = []

    def closure():
        x = torch.cat([p.detach().flatten() for p in parts])
        f, g = fg(x)
        losses.append(f)
        for p, a, b in zip(parts, cuts, cuts[1:]):
            p.grad = g[a:b].reshape(p.shape).clone()
        return f

    groups = [dict(params=[p], bounds=(lower[a:b].reshape(p.shape), upper[a:b].reshape(p.shape)))
              for p, a, b in zip(parts, cuts, cuts[1:])]
    opt = LBFGS(groups, history_size=m, max_iter=15000, max_eval=15000, tolerance_grad=PGTOL,
                tolerance_change=FTOL)
    opt.step(closure)
    assert len(losses) == len(whole_losses)
    for a, b in zip(losses, whole_losses):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    torch.testing.assert_close(torch.cat([p.detach().flatten() for p in parts]), whole, rtol=0, atol=1e-8)


def test_float32_parameters_stay_in_the_box():
    """float32 parameters (staged through the float64 vectors): every trial point in the box
    (the bounds rounded to float32), the float64 optimum to float32 accuracy."""
    name = "box_quadratic"
    fg, x0, lower, upper, _ = _problem(name)
    x, _, _ = _run(name, dtype=torch.float32, tolerance_grad=1e-4, tolerance_change=1e-7)
    lo32, hi32 = lower.float().double(), upper.float().double()
    assert bool(((x >= lo32) & (x <= hi32)).all())
    f, _ = fg(x)
    assert abs(f - _scipy(name).fun) <= 1e-4 * abs(_scipy(name).fun)


@pytest.mark.parametrize("history_dtype", [torch.float32, torch.bfloat16])
def test_narrower_history(history_dtype):
    """A float32 or bfloat16 ring (its products widened to float64): the same optimum."""
    name = "box_quadratic"
    fg, _, lower, upper, _ = _problem(name)
    x, losses, _ = _run(name, history_dtype=history_dtype)
    f, g = fg(x)
    assert bool(((x >= lower) & (x <= upper)).all())
    assert abs(f - _scipy(name).fun) <= 1e-6 * abs(_scipy(name).fun)
    assert float(projected_gradient(x, g, lower, upper).abs().max()) < 1e-5
    assert len(losses) <= 2 * _scipy(name).nfev


def test_bench_runs_at_a_tiny_size():
    from bench import lbfgsb as bench_lbfgsb

    (row,) = bench_lbfgsb.main(["--smoke"])
    ours, theirs = row["mlbfgs_fused.LBFGS"], row["scipy L-BFGS-B"]
    assert ours["median_s"] > 0 and theirs["median_s"] > 0
    assert ours["f"] == pytest.approx(theirs["f"], rel=1e-6)


def test_steps_carry_on_where_the_last_one_stopped():
    """Many steps of 5 iterations take the iterations of one long step (the memory, the
    first-iteration rules and the pairs carry over; each step only evaluates its start
    once more), and lr = 0.5 (a shorter first trial) reaches the same optimum."""
    name = "logistic_in_a_box"
    fg, x0, lower, upper, m = _problem(name)
    whole, _, long_run = _run(name)
    iterations = long_run.state[long_run.param_groups[0]["params"][0]]["n_iter"]
    x = x0.clone().requires_grad_()

    def closure():
        f, g = fg(x.detach())
        x.grad = g
        return f

    opt = LBFGS([x], bounds=(lower, upper), history_size=m, max_iter=5, max_eval=100, tolerance_grad=PGTOL,
                tolerance_change=FTOL)
    while opt.state[x].get("n_iter", 0) < iterations:
        opt.step(closure)
    torch.testing.assert_close(x.detach(), whole, rtol=0, atol=0)
    shorter, _, _ = _run(name, lr=0.5)
    assert fg(shorter)[0] == pytest.approx(fg(whole)[0], rel=1e-10)


def test_start_is_projected_and_every_trial_is_feasible():
    name = "infeasible_start"
    fg, x0, lower, upper, m = _problem(name)
    x = x0.clone().requires_grad_()
    assert bool(((x0 < lower) | (x0 > upper)).any())
    seen = []

    def closure():
        seen.append(x.detach().clone())
        f, g = fg(x.detach())
        x.grad = g
        return f

    LBFGS([x], bounds=(lower, upper), history_size=m, max_iter=30).step(closure)
    torch.testing.assert_close(seen[0], torch.clamp(x0, lower, upper), rtol=0, atol=0)
    for point in seen:
        assert bool(((point >= lower) & (point <= upper)).all())


def test_numbers_and_one_sided_bounds():
    """Numbers as bounds, a per-group bounds beside the constructor's default, and None sides."""
    torch.manual_seed(0)
    target = torch.randn(6, dtype=F64) * 3
    a = torch.randn(3, dtype=F64, requires_grad=True)
    b = torch.randn(3, dtype=F64, requires_grad=True)

    def closure():
        a.grad = b.grad = None
        loss = ((torch.cat([a, b]) - target) ** 2).sum()
        loss.backward()
        return loss

    opt = LBFGS([dict(params=[a]), dict(params=[b], bounds=(None, 0.5))], bounds=(-1.0, None),
                tolerance_grad=1e-10, max_iter=100)
    opt.step(closure)
    torch.testing.assert_close(a.detach(), target[:3].clamp(min=-1.0), rtol=0, atol=1e-9)
    torch.testing.assert_close(b.detach(), target[3:].clamp(max=0.5), rtol=0, atol=1e-9)


def test_maximize_is_minimizing_the_negation():
    name = "logistic_in_a_box"
    fg, x0, lower, upper, m = _problem(name)
    ours, _, _ = _run(name)
    x = x0.clone().requires_grad_()

    def closure():
        f, g = fg(x.detach())
        x.grad = -g
        return torch.tensor(-f, dtype=F64)

    LBFGS([x], bounds=(lower, upper), history_size=m, max_iter=15000, max_eval=15000, tolerance_grad=PGTOL,
          tolerance_change=FTOL, maximize=True).step(closure)
    torch.testing.assert_close(x.detach(), ours, rtol=0, atol=0)


def test_host_reads_one_copy_per_evaluation_and_one_per_direction(monkeypatch):
    name = "bounded_rosenbrock"
    _, x0, lower, upper, m = _problem(name)
    x = x0.clone().requires_grad_()

    def closure():  # no host read of its own
        x.grad = None
        loss = (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
        loss.backward()
        return loss

    opt = LBFGS([x], bounds=(lower, upper), history_size=m, max_iter=5, max_eval=100, tolerance_grad=0.0,
                tolerance_change=0.0)
    opt.step(closure)  # the first step builds the state
    before = dict(opt.state[x])
    copies = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        copies.append(self.numel())
        return original(self)

    # As on a GPU: the Cauchy point's search without the CPU's early stop (a read per chunk).
    monkeypatch.setattr(_bounds, "CPU_SHORTCUTS", False)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    with _HostReads() as reads:
        opt.step(closure)
    monkeypatch.undo()
    evaluations = opt.state[x]["func_evals"] - before["func_evals"]
    iterations = opt.state[x]["n_iter"] - before["n_iter"]
    assert iterations == 5
    assert reads.count == 0
    assert len(copies) == evaluations + iterations  # no restart on this problem
    assert max(copies) <= 5


# -- without bounds nothing changes ------------------------------------------------------------
@pytest.mark.parametrize("bounds", [None, (None, None), (-INF, INF)])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_without_bounds_nothing_changes(bounds, line_search_fn):
    def run(**kwargs):
        torch.manual_seed(3)
        w = torch.randn(5, 4, dtype=F64, requires_grad=True)
        v = torch.randn(4, dtype=F64, requires_grad=True)
        X = torch.randn(40, 5, dtype=F64)
        y = torch.randn(40, 4, dtype=F64)

        def closure():
            w.grad = v.grad = None
            loss = ((X @ w + v - y) ** 2).mean() + (w ** 4).sum() * 0.01
            loss.backward()
            return loss

        opt = LBFGS([dict(params=[w]), dict(params=[v], lr=0.5)], line_search_fn=line_search_fn, max_iter=8,
                    **kwargs)
        for _ in range(3):
            opt.step(closure)
        return w.detach(), v.detach(), opt

    w0, v0, plain = run()
    w1, v1, twin = run(bounds=bounds)
    assert torch.equal(w0, w1) and torch.equal(v0, v1)
    assert not _bounds.bounded(twin)
    for key in ("gram", "pair_count", "n_iter", "func_evals"):
        a, b = plain.state[plain.param_groups[0]["params"][0]][key], twin.state[twin.param_groups[0]["params"][0]][key]
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b)), key


# -- checkpoints -------------------------------------------------------------------------------
def test_state_dict_round_trip_with_bounds():
    """Two steps, a checkpoint, two more steps in a fresh optimizer built without bounds (the
    checkpoint's bounds come back with its groups): bit for bit the uninterrupted run."""
    name = "bounded_rosenbrock"
    fg, x0, lower, upper, m = _problem(name)

    def closure_for(x):
        def closure():
            f, g = fg(x.detach())
            x.grad = g
            return torch.tensor(f, dtype=F64)

        return closure

    x = x0.clone().requires_grad_()
    opt = LBFGS([x], bounds=(lower, upper), history_size=m, max_iter=6)
    for _ in range(4):
        opt.step(closure_for(x))

    y = x0.clone().requires_grad_()
    first = LBFGS([y], bounds=(lower, upper), history_size=m, max_iter=6)
    for _ in range(2):
        first.step(closure_for(y))
    saved = copy.deepcopy(first.state_dict())
    z = y.detach().clone().requires_grad_()
    resumed = LBFGS([z], history_size=m, max_iter=6)
    resumed.load_state_dict(saved)
    assert _bounds.bounded(resumed)
    for _ in range(2):
        resumed.step(closure_for(z))
    assert torch.equal(z.detach(), x.detach())
    assert resumed.state[z]["func_evals"] == opt.state[x]["func_evals"]
    assert torch.equal(resumed.state[z]["gram"], opt.state[x]["gram"])


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_raises():
    x = torch.zeros(3, dtype=F64, requires_grad=True)
    w = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="lower > upper at 1 of 3"):
        LBFGS([x], bounds=(torch.tensor([0.0, 2.0, 0.0]), torch.tensor([1.0, 1.0, 1.0])))
    with pytest.raises(ValueError, match="lower > upper"):
        LBFGS([x], bounds=(1.0, -1.0))
    with pytest.raises(ValueError, match=r"lower bound has shape \(4,\), but its parameter has shape \(3,\)"):
        LBFGS([x], bounds=(torch.zeros(4), None))
    with pytest.raises(ValueError, match=r"upper bound has shape \(3,\), but its parameter has shape \(2, 2\)"):
        LBFGS([dict(params=[w], bounds=(None, torch.ones(3)))])
    with pytest.raises(ValueError, match="a group of one parameter, but the group has 2"):
        LBFGS([x, w], bounds=(torch.zeros(3), None))
    with pytest.raises(TypeError, match="real floating-point parameters, but got a torch.complex64"):
        LBFGS([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], bounds=(0.0, 1.0))
    with pytest.raises(TypeError, match="real floating-point parameters, but got a torch.int64"):
        LBFGS([torch.zeros(3, dtype=torch.int64)], bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="MLBFGS does not take bounds"):
        MLBFGS([x], bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="MLBFGS does not take bounds"):
        MLBFGS([dict(params=[x], bounds=(0.0, 1.0))])
    with pytest.raises(TypeError, match="bounds must be None or a pair"):
        LBFGS([x], bounds=1.0)
    with pytest.raises(TypeError, match="bounds must be None or a pair"):
        LBFGS([x], bounds=(0.0,))
    with pytest.raises(TypeError, match="Invalid upper bound"):
        LBFGS([x], bounds=(0.0, "1"))
    with pytest.raises(TypeError, match="Invalid lower bound"):
        LBFGS([x], bounds=(torch.zeros(3, dtype=torch.complex64), None))
    with pytest.raises(ValueError, match="Invalid lower bound: nan"):
        LBFGS([x], bounds=(math.nan, None))
    with pytest.raises(ValueError, match="Invalid upper bound: it holds NaN"):
        LBFGS([x], bounds=(None, torch.tensor([1.0, math.nan, 1.0])))
    with pytest.raises(ValueError, match="no point lies"):
        LBFGS([x], bounds=(INF, None))
    with pytest.raises(ValueError, match="one lr for all parameter groups"):
        LBFGS([dict(params=[x], lr=0.5), dict(params=[w])], bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="one lr for all parameter groups"):
        LBFGS([dict(params=[x], bounds=(0.0, 1.0)), dict(params=[w], lr=0.5)])
    # A bad group leaves the optimizer as it was.
    opt = LBFGS([x], bounds=(0.0, 1.0))
    with pytest.raises(ValueError):
        opt.add_param_group(dict(params=[w], bounds=(2.0, 1.0)))
    assert len(opt.param_groups) == 1
    # An lr changed after construction is caught at the step.
    opt.add_param_group(dict(params=[w]))
    opt.param_groups[1]["lr"] = 0.1
    with pytest.raises(ValueError, match="one lr for all parameter groups"):
        opt.step(lambda: 0.0)


if __name__ == "__main__":
    print(f"{'problem':38s} {'|f - f_scipy| / |f|':>20s} {'projected grad':>15s} {'evals':>6s} {'scipy':>6s}")
    for problem in SCIPY_PROBLEMS:
        for name in ("foreach", "cpp"):
            r = _summary(problem, name)
            print(f"{problem + ' (' + name + ')':38s} {r['objective']:20.1e} {r['projected_gradient']:15.1e} "
                  f"{r['evals']:6d} {r['scipy_evals']:6d}")
