"""LBFGS against torch.optim.LBFGS itself (float64), its float64 reference, and its extensions."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlbfgs_fused import LBFGS
from mlbfgs_fused._line_search import Point
from mlbfgs_fused.reference import ReferenceLBFGS

from lbfgs_problems import PROBLEMS, check_against_torch, run

SETTINGS = {
    "default": dict(max_iter=20, max_eval=40),
    "short": dict(max_iter=5, max_eval=12, tolerance_grad=1e-5, tolerance_change=1e-12),
    "loose": dict(max_iter=8, max_eval=20, tolerance_grad=1e-3, tolerance_change=1e-4),
}


# Parameters agree "to rounding": LBFGS forms the direction from the Gram matrix, torch from
# vectors, so the two round differently from the first pair on. The rounding differences grow
# along the trajectory exactly as a one-ulp change of the starting point does in torch itself, so
# the bound is ten times that change (and at least 1e-12 relative). The counters must be equal.
CASES = [
    (problem, line_search_fn, history_size, setting)
    for problem, line_search_fn in itertools.product(PROBLEMS, [None, "strong_wolfe"])
    for history_size, setting in [(3, "default"), (100, "short"), (3, "loose")]
] + [(problem, "strong_wolfe", 100, "default") for problem in ("rosenbrock", "mlp")]


@pytest.mark.parametrize("problem,line_search_fn,history_size,setting", CASES)
def test_matches_torch_lbfgs(problem, line_search_fn, history_size, setting):
    kwargs = dict(SETTINGS[setting], line_search_fn=line_search_fn, history_size=history_size)
    s_ours, _ = check_against_torch(LBFGS, problem, 3, 1e-12, **kwargs)
    if history_size == 3:
        assert s_ours["n_iter"] > 3  # the ring wrapped


# -- extensions -----------------------------------------------------------------------------
def _split_least_squares(dtypes=(torch.float64, torch.float64), seed=0):
    """Least squares over x = [a; b] held as two parameters."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(40, 12, generator=g, dtype=torch.float64)
    rhs = torch.randn(40, generator=g, dtype=torch.float64)
    x0 = torch.randn(12, generator=g, dtype=torch.float64)
    a = x0[:5].clone().to(dtypes[0]).requires_grad_()
    b = x0[5:].clone().to(dtypes[1]).requires_grad_()

    def loss_of(x):
        return 0.5 * ((A @ x - rhs) ** 2).sum()

    def fg(x):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            f = loss_of(x)
            f.backward()
        return f.detach(), x.grad

    return a, b, x0, loss_of, fg


def _step_all(opt, params, loss_of, steps, sign=1.0):
    def closure():
        opt.zero_grad()
        loss = sign * loss_of(torch.cat([p.double() for p in params]))
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return torch.cat([p.detach().double() for p in params])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_two_groups_equal_one_group(line_search_fn):
    kwargs = dict(line_search_fn=line_search_fn, history_size=4, max_iter=15, max_eval=30)
    a, b, _, loss_of, _ = _split_least_squares()
    one = LBFGS([a, b], lr=0.5, **kwargs)
    x_one = _step_all(one, [a, b], loss_of, 3)
    a2, b2, _, _, _ = _split_least_squares()
    two = LBFGS([{"params": [a2]}, {"params": [b2]}], lr=0.5, **kwargs)
    x_two = _step_all(two, [a2, b2], loss_of, 3)
    assert (two.state[a2]["func_evals"], two.state[a2]["n_iter"]) == (one.state[a]["func_evals"], one.state[a]["n_iter"])
    # Dots are summed per group instead of over one flat vector: equal up to rounding.
    torch.testing.assert_close(x_two, x_one, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_group_lr_scales_its_part_of_the_step(line_search_fn):
    kwargs = dict(line_search_fn=line_search_fn, history_size=4, max_iter=10, max_eval=25)
    a, b, x0, loss_of, fg = _split_least_squares()
    opt = LBFGS([{"params": [a], "lr": 0.8}, {"params": [b], "lr": 0.2}], **kwargs)
    x = _step_all(opt, [a, b], loss_of, 3)
    scale = torch.cat([torch.full((5,), 1.0), torch.full((7,), 0.25)]).double()
    ref = ReferenceLBFGS(lr=0.8, scale=scale, **kwargs)
    x_ref = x0.clone()
    for _ in range(3):
        x_ref = ref.step(x_ref, fg)
    assert (opt.state[a]["func_evals"], opt.state[a]["n_iter"]) == (ref.func_evals, ref.n_iter)
    torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-12)

    a, b, x0, loss_of, _ = _split_least_squares()
    frozen = LBFGS([{"params": [a]}, {"params": [b], "lr": 0.0}], **kwargs)
    _step_all(frozen, [a, b], loss_of, 2)
    assert torch.equal(b.detach(), x0[5:]) and not torch.equal(a.detach(), x0[:5])


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_maximize_is_minimizing_the_negation(line_search_fn):
    kwargs = dict(line_search_fn=line_search_fn, history_size=3, max_iter=10)
    a, b, _, loss_of, _ = _split_least_squares()
    x_min = _step_all(LBFGS([a, b], **kwargs), [a, b], loss_of, 3)
    a, b, _, loss_of, _ = _split_least_squares()
    x_max = _step_all(LBFGS([a, b], maximize=True, **kwargs), [a, b], loss_of, 3, sign=-1.0)
    assert torch.equal(x_max, x_min)


def test_mixed_dtypes_follow_the_float64_reference():
    kwargs = dict(line_search_fn="strong_wolfe", history_size=4, max_iter=10)
    a, b, x0, loss_of, fg = _split_least_squares(dtypes=(torch.float32, torch.float64))
    opt = LBFGS([a, b], **kwargs)
    x = _step_all(opt, [a, b], loss_of, 2)
    ref = ReferenceLBFGS(**kwargs)
    x_ref = x0.clone()
    for _ in range(2):
        x_ref = ref.step(x_ref, fg)
    assert a.dtype == torch.float32 and b.dtype == torch.float64
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-5)


def _walled_quadratic(wall: float):
    """sum((x - c)^2), NaN once any |x| exceeds ``wall``: big steps land on NaN."""
    c = torch.tensor([1.0, -2.0, 0.5, 1.5], dtype=torch.float64)

    def loss_of(x):
        f = ((x - c) ** 2).sum()
        return f * torch.where(x.abs().max() > wall, math.nan, 1.0)

    def fg(x):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            f = loss_of(x)
            f.backward()
        return f.detach(), x.grad

    return loss_of, fg


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_non_finite_trial_point_backs_off_and_never_enters_the_history(line_search_fn):
    loss_of, fg = _walled_quadratic(wall=3.0)
    kwargs = dict(lr=4.0, line_search_fn=line_search_fn, history_size=3, max_iter=10, max_eval=30)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = LBFGS([x], **kwargs)
    _step_all(opt, [x], loss_of, 2)
    state = opt.state[x]
    assert torch.isfinite(x).all()
    ring = state
    assert torch.isfinite(ring["history_s"]).all() and torch.isfinite(ring["history_y"]).all()
    assert torch.isfinite(state["gram"]).all() and int(state["pair_count"]) > 0
    assert float(loss_of(x.detach())) < 1e-6
    ref = ReferenceLBFGS(**kwargs)
    x_ref = torch.zeros(4, dtype=torch.float64)
    for _ in range(2):
        x_ref = ref.step(x_ref, fg)
    assert (state["func_evals"], state["n_iter"]) == (ref.func_evals, ref.n_iter)
    torch.testing.assert_close(x.detach(), x_ref, rtol=1e-10, atol=1e-12)

    # torch.optim.LBFGS walks into the wall on the same problem.
    y = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    ours_kwargs = {k: v for k, v in kwargs.items()}
    _step_all(torch.optim.LBFGS([y], **ours_kwargs), [y], loss_of, 2)
    assert not torch.isfinite(y).all()


def _best_of_two_trials(evaluate, keep, f0, gtd0, t, d_norm, max_evals, **kwargs):
    """A line search that returns earlier points: trials at ``t`` and ``2 t``, then the
    lowest loss of the start and the two, so the gradient the step goes on with is the
    last evaluation's, a kept trial's or the start's."""
    points = [Point(0.0, f0, gtd0, 0)]
    for k, step in enumerate((t, 2 * t)[:max_evals], 1):
        if k > 1:
            keep(points[-1])
        f, gtd = evaluate(step)
        points.append(Point(step, f if math.isfinite(f) else math.inf, gtd, k))
    return min(points, key=lambda p: p.f), len(points) - 1


def test_the_gradient_of_a_kept_trial_or_of_the_start_carries_on(monkeypatch):
    import mlbfgs_fused.lbfgs as lbfgs_module
    import mlbfgs_fused.reference.lbfgs as reference_module
    from mlbfgs_fused.backends._lbfgs import SOURCE_GRAD, SOURCE_KEPT, SOURCE_PREV

    monkeypatch.setattr(lbfgs_module, "_strong_wolfe", _best_of_two_trials)
    monkeypatch.setattr(reference_module, "_strong_wolfe", _best_of_two_trials)
    kwargs = dict(line_search_fn="strong_wolfe", history_size=3, max_iter=10, max_eval=30)
    a, b, x0, loss_of, fg = _split_least_squares()
    opt = LBFGS([a, b], **kwargs)
    plan = opt.plan
    sources = []
    direction = plan.direction
    monkeypatch.setattr(plan, "direction", lambda source, *args: (sources.append(source), direction(source, *args)))
    ref = ReferenceLBFGS(**kwargs)
    x_ref = x0.clone()
    # lr 8 overshoots: the start is the best point (t = 0, the pair is rejected); a negative
    # tolerance_change keeps the loop going from there.
    for lr, tolerance_change in [(0.7, 1e-9), (8.0, -1.0), (0.7, 1e-9)]:
        opt.param_groups[0].update(lr=lr, tolerance_change=tolerance_change)
        ref.lr, ref.tolerance_change = lr, tolerance_change
        x = _step_all(opt, [a, b], loss_of, 1)
        x_ref = ref.step(x_ref, fg)
        assert (opt.state[a]["func_evals"], opt.state[a]["n_iter"]) == (ref.func_evals, ref.n_iter)
        torch.testing.assert_close(x, x_ref, rtol=1e-10, atol=1e-12)
        # the gradient the last direction was formed at (after a return to the start: the start's)
        prev_grad = torch.cat([opt.state[p]["prev_grad"].reshape(-1) for p in (a, b)])
        torch.testing.assert_close(prev_grad, ref.prev_grad, rtol=1e-10, atol=1e-12)
    assert {SOURCE_GRAD, SOURCE_KEPT, SOURCE_PREV} <= set(sources)
    assert int(opt.state[a]["pair_count"]) < opt.state[a]["n_iter"] - 1  # some pairs were rejected


def test_max_eval_holds_inside_the_line_search():
    kwargs = dict(line_search_fn="strong_wolfe", history_size=5, max_iter=5, max_eval=6)
    overrun = False
    for cls in (LBFGS, torch.optim.LBFGS):
        params, loss_fn = PROBLEMS["rosenbrock"]()
        opt = cls(params, **kwargs)

        def closure():
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            return loss

        for _ in range(8):
            before = opt.state[params[0]].get("func_evals", 0)
            opt.step(closure)
            used = opt.state[params[0]]["func_evals"] - before
            if cls is LBFGS:
                assert used <= kwargs["max_eval"]
            overrun |= used > kwargs["max_eval"]
    assert overrun  # torch's line search takes one more on this problem


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_state_dict_resumes_bit_exactly(dtype, line_search_fn):
    kwargs = dict(line_search_fn=line_search_fn, history_size=3, max_iter=6)
    torch.manual_seed(0)
    X, y = torch.randn(64, 4, dtype=dtype), torch.randn(64, 1, dtype=dtype)

    def make():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)

    def steps(model, opt, n):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X), y)
            loss.backward()
            return loss

        for _ in range(n):
            opt.step(closure)

    model = make()
    opt = LBFGS(model.parameters(), **kwargs)
    steps(model, opt, 2)
    saved_state = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    steps(model, opt, 2)

    resumed = make()
    resumed.load_state_dict(saved_model)
    opt2 = LBFGS(resumed.parameters(), **kwargs)
    opt2.load_state_dict(saved_state)
    steps(resumed, opt2, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    first, first2 = opt.state[next(model.parameters())], opt2.state[next(resumed.parameters())]
    assert first2["gram"].dtype == torch.float64 and first2["pair_count"].dtype == torch.int64
    assert (first2["func_evals"], first2["n_iter"]) == (first["func_evals"], first["n_iter"])


# -- host synchronisations --------------------------------------------------------------------
class _HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()`` of a tensor)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _count_host_reads(cls, line_search_fn, monkeypatch):
    params, loss_fn = PROBLEMS["logistic"]()
    opt = cls(params, line_search_fn=line_search_fn, history_size=10, max_iter=15,
              tolerance_grad=0.0, tolerance_change=0.0)
    tolist_calls = []
    original = torch.Tensor.tolist

    def counting_tolist(self):
        tolist_calls.append(self.numel())
        return original(self)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)  # the first step builds the state
    before = dict(opt.state[params[0]])
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    with _HostReads() as reads:
        opt.step(closure)
    monkeypatch.undo()
    state = opt.state[params[0]]
    iterations = state["n_iter"] - before["n_iter"]
    evaluations = state["func_evals"] - before["func_evals"]
    return reads.count, len(tolist_calls), iterations, evaluations


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_host_reads_one_copy_per_evaluation(line_search_fn, monkeypatch):
    scalar_reads, copies, iterations, evaluations = _count_host_reads(LBFGS, line_search_fn, monkeypatch)
    assert scalar_reads == 0
    assert iterations == 15
    assert copies == evaluations
    torch_reads, _, torch_iterations, _ = _count_host_reads(torch.optim.LBFGS, line_search_fn, monkeypatch)
    assert torch_iterations == iterations
    # torch.optim.LBFGS reads about 2 m + 8 scalars per iteration (m = 10 here).
    assert torch_reads / torch_iterations > 10 * copies / iterations


# -- arguments and the bench ------------------------------------------------------------------
def test_arguments_in_torchs_wording():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        LBFGS([x], lr=-1)
    with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
        LBFGS([x], line_search_fn="armijo")
    with pytest.raises(ValueError, match="max_iter"):
        LBFGS([{"params": [x]}, {"params": [torch.zeros(2, requires_grad=True)], "max_iter": 3}])
    with pytest.raises(ValueError, match="float32 and float64"):
        LBFGS([torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)])
    opt = LBFGS([x])
    assert opt.defaults["max_eval"] == 25 and opt.defaults["history_size"] == 100


def test_bench_runs_at_tiny_sizes():
    from bench import lbfgs as bench_lbfgs

    (row,) = bench_lbfgs.main(["--smoke"])
    assert row["mlbfgs_fused.LBFGS"]["iter_s"] > 0 and row["torch.optim.LBFGS"]["iter_s"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
def test_parameters_on_cuda_and_cpu_form_one_model(line_search_fn):
    """Part of x on the GPU, part on the CPU: the same run as all on the CPU, no scalar reads."""
    kwargs = dict(line_search_fn=line_search_fn, history_size=4, max_iter=10)
    results = []
    for device in ("cpu", "cuda"):
        a, b, _, _, _ = _split_least_squares(seed=3)
        g = torch.Generator().manual_seed(4)
        A = torch.randn(40, 12, generator=g, dtype=torch.float64)
        rhs = torch.randn(40, generator=g, dtype=torch.float64)
        a = a.detach().to(device).requires_grad_()
        A_a = A[:, :5].to(device)
        opt = LBFGS([a, b], **kwargs)

        def closure():
            opt.zero_grad()
            residual = (A_a @ a).cpu() + A[:, 5:] @ b - rhs
            loss = 0.5 * residual.dot(residual)
            loss.backward()
            return loss

        opt.step(closure)
        with _HostReads() as reads:
            opt.step(closure)
        if device == "cuda":
            assert reads.count == 0
        results.append((torch.cat([a.detach().cpu(), b.detach()]), opt.state[a]["func_evals"]))
    (x_cpu, evals_cpu), (x_cuda, evals_cuda) = results
    assert evals_cpu == evals_cuda
    torch.testing.assert_close(x_cuda, x_cpu, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("version", ["0_1", "0_2"])
def test_checkpoint_of_an_earlier_version_loads_and_continues(version):
    """``tests/data/lbfgs_checkpoint_v0_1.pt`` was saved by version 0.1 (its model was
    ``gram`` ``[3, m, m]`` and ``ring_grad_dots``), ``..._v0_2.pt`` by version 0.2 (``gram``
    ``[2m, 2m + 1]``, ``[S; Y] [S; Y; g]^T``, the ring beside the per-element state), each
    after five iterations with a wrapped ring of three. Loaded today, the next four
    iterations match a run that never stopped."""
    from pathlib import Path

    saved = torch.load(Path(__file__).parent / "data" / f"lbfgs_checkpoint_v{version}.pt", weights_only=False)
    A, b = saved["A"], saved["b"]

    def run(start=None):
        w = torch.nn.Parameter(torch.zeros(7, dtype=torch.float64))
        c = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = LBFGS([w, c], lr=0.5, history_size=3, max_iter=5)

        def closure():
            opt.zero_grad()
            loss = ((A @ w + c - b) ** 2).mean() + 0.1 * (w**4).sum()
            loss.backward()
            return loss

        if start is None:
            opt.step(closure)
        else:
            with torch.no_grad():
                w.copy_(start["params"][0])
                c.copy_(start["params"][1])
            opt.load_state_dict(start["state_dict"])
        opt.param_groups[0]["max_iter"] = 4
        opt.step(closure)
        return torch.cat([w.detach(), c.detach()]), opt

    resumed, opt = run(saved)
    uninterrupted, reference_opt = run()
    first_state = opt.state[opt.param_groups[0]["params"][0]]
    assert not {"ring_grad_dots", "direction_coefficients", "staged_alpha"} & set(first_state)
    assert first_state["gram"].shape == (3, 3, 3) and first_state["history_s"].shape == (3, 8)
    assert first_state["n_iter"] == 9
    torch.testing.assert_close(resumed, uninterrupted, rtol=1e-9, atol=1e-12)
    first = opt.param_groups[0]["params"][0]
    torch.testing.assert_close(opt.state[first]["gram"], reference_opt.state[reference_opt.param_groups[0]["params"][0]]["gram"],
                               rtol=1e-9, atol=1e-12)


def test_checkpoint_of_version_0_1_saved_before_any_direction_loads():
    """Saved when the first evaluation already met the tolerance, a version 0.1 state has
    its empty ``[3, m, m]`` model and no ``ring_grad_dots``: it loads as an empty model."""
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = LBFGS([w], history_size=3)
    opt.state[w].update(gram=torch.zeros(3, 3, 3, dtype=torch.float64), pair_count=torch.zeros((), dtype=torch.int64),
                        func_evals=1, n_iter=0)
    opt.load_state_dict(opt.state_dict())

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    gram = opt.state[w]["gram"]
    assert gram.shape == (3, 3, 3) and torch.isfinite(gram).all() and float((w.detach() ** 2).sum()) < 1e-20


def test_a_diverged_run_saves_and_resumes_with_a_warning():
    """A loss unbounded below (the sum of a batch norm's output is linear in its bias, as
    in PyTorch's generic state_dict tests) overflows within three steps and leaves
    non-finite values in the state. torch.optim.LBFGS saves and loads that state; so does
    this one, saying so, and the resumed optimizer steps as the one it was saved from."""
    torch.manual_seed(1)

    def build():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        return model, LBFGS(model.parameters(), line_search_fn="strong_wolfe")

    data = torch.rand(1, 4, 16, 16)

    def closure_of(model, opt):
        def closure():
            opt.zero_grad()
            loss = model(data).sum()
            loss.backward()
            return loss
        return closure

    model, opt = build()
    for _ in range(3):
        opt.step(closure_of(model, opt))
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert not all(bool(torch.isfinite(v).all()) for v in state), "the run was meant to diverge"

    twin_model, twin = build()
    twin_model.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning, match="holds a NaN or an infinity"):
        twin.load_state_dict(opt.state_dict())
    opt.step(closure_of(model, opt))
    twin.step(closure_of(twin_model, twin))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True)
