"""The float64 L-BFGS-B reference: its pieces against hand-derived and dense results, the whole
against ``scipy.optimize.minimize(method="L-BFGS-B")`` with the same ``maxcor``.

``python tests/test_lbfgsb_reference.py`` prints the per-problem comparison table.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mlbfgs_fused.reference import minimize_lbfgsb
from mlbfgs_fused.reference.lbfgsb import (
    CompactModel,
    breakpoints,
    generalized_cauchy_point,
    generalized_cauchy_point_parallel,
    max_step,
    more_thuente,
    project,
    trial_point,
    projected_gradient,
    subspace_minimization,
)

import numpy as np
import scipy.optimize

F64 = torch.float64
INF = math.inf


@pytest.fixture(autouse=True)
def _one_thread():
    """Problems of at most a few hundred variables: threads only add synchronisation (and, on
    a busy machine, spinning), so these tests run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------
# Problems: (fg, x0, lower, upper, m); fg(x) -> (f, g) on a flat float64 tensor.


def _rosenbrock_fg(x):
    a, b = x[:-1], x[1:]
    f = float((100 * (b - a * a) ** 2 + (1 - a) ** 2).sum())
    g = torch.zeros_like(x)
    g[:-1] = -400 * a * (b - a * a) - 2 * (1 - a)
    g[1:] += 200 * (b - a * a)
    return f, g


def bounded_rosenbrock(n=60, seed=0):
    """Every fourth variable capped at 0.8 and every fourth held at or above 1.1: the optimum (all ones) is cut off."""
    x0 = torch.rand(n, generator=_gen(seed), dtype=F64) * 3 - 1.5
    lower = torch.full((n,), -2.0, dtype=F64)
    upper = torch.full((n,), 2.0, dtype=F64)
    upper[0::4] = 0.8
    lower[2::4] = 1.1
    return _rosenbrock_fg, x0, lower, upper, 10


def nonnegative_least_squares(rows=80, cols=60, seed=1):
    """min 0.5 ||A x - b||^2 over x >= 0 (only lower bounds)."""
    gen = _gen(seed)
    A = torch.randn(rows, cols, generator=gen, dtype=F64) * torch.logspace(0, 1, cols, dtype=F64)
    b = torch.randn(rows, generator=gen, dtype=F64)

    def fg(x):
        r = A @ x - b
        return 0.5 * float(r.dot(r)), A.T @ r

    x0 = torch.rand(cols, generator=gen, dtype=F64)
    return fg, x0, torch.zeros(cols, dtype=F64), torch.full((cols,), INF, dtype=F64), 7


def _box_quadratic(n, seed, x0_scale):
    gen = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    Q = q @ torch.diag(torch.logspace(-1, 1.5, n, dtype=F64)) @ q.T
    c = 4 * torch.randn(n, generator=gen, dtype=F64)

    def fg(x):
        Qx = Q @ x
        return float(0.5 * x.dot(Qx) + c.dot(x)), Qx + c

    x0 = x0_scale * torch.randn(n, generator=gen, dtype=F64)
    return fg, x0, -torch.ones(n, dtype=F64), torch.ones(n, dtype=F64)


def box_quadratic(n=100, seed=2):
    """0.5 x^T Q x + c^T x over [-1, 1]^n, Q of condition 300, c large: most bounds are active."""
    fg, x0, lower, upper = _box_quadratic(n, seed, 0.3)
    return fg, project(x0, lower, upper), lower, upper, 10


def infeasible_start(n=60, seed=3):
    """A box quadratic started far outside the box (the start is projected first)."""
    fg, x0, lower, upper = _box_quadratic(n, seed, 5.0)
    assert bool(((x0 < lower) | (x0 > upper)).any())
    return fg, x0, lower, upper, 5


@functools.lru_cache(maxsize=1)
def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=F64)
    X = (X - X.mean(0)) / X.std(0)
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=F64)], 1), torch.tensor(y, dtype=F64)


def logistic_in_a_box(seed=4):
    """Mean logistic loss on breast_cancer (standardised): weights in [-0.6, 0.6], the intercept free."""
    X, y = _breast_cancer()
    n = X.shape[1]

    def fg(w):
        z = X @ w
        f = float((torch.nn.functional.softplus(z) - y * z).mean())
        return f, X.T @ (torch.sigmoid(z) - y) / X.shape[0]

    lower = torch.full((n,), -0.6, dtype=F64)
    upper = torch.full((n,), 0.6, dtype=F64)
    lower[-1], upper[-1] = -INF, INF
    x0 = 0.1 * torch.randn(n, generator=_gen(seed), dtype=F64)
    return fg, x0, lower, upper, 10


def upper_bounds_only(rows=100, cols=30, seed=5):
    """Poisson regression, sum(exp(X w)) - y^T X w, with w <= 0.5 and no lower bound.

    y = exp(X w_true) with w_true uniform in [-1, 1]: the caps bind where w_true is above them.
    """
    gen = _gen(seed)
    X = 0.3 * torch.randn(rows, cols, generator=gen, dtype=F64)
    y = torch.exp(X @ (2 * torch.rand(cols, generator=gen, dtype=F64) - 1))

    def fg(w):
        mu = torch.exp(X @ w)
        return float(mu.sum() - y.dot(X @ w)), X.T @ (mu - y)

    x0 = 0.1 * torch.randn(cols, generator=gen, dtype=F64)
    return fg, x0, torch.full((cols,), -INF, dtype=F64), torch.full((cols,), 0.5, dtype=F64), 6


def flat_far_optimum(n=20, seed=7):
    """A flat objective (curvature about 0.03) whose optimum lies partly beyond the box [0, 10]^n:
    from the first iteration on, the line search runs into the boundary."""
    gen = _gen(seed)
    c = 12 * torch.rand(n, generator=gen, dtype=F64)
    w = 0.01 * (1 + torch.rand(n, generator=gen, dtype=F64))

    def fg(x):
        r = x - c
        return float((w * r * r + 0.05 * torch.log(torch.cosh(r))).sum()) + 1.0, 2 * w * r + 0.05 * torch.tanh(r)

    x0 = 0.5 * torch.rand(n, generator=gen, dtype=F64)
    return fg, x0, torch.zeros(n, dtype=F64), torch.full((n,), 10.0, dtype=F64), 5


def ramp_past_the_box(n=8, seed=9):
    """Per variable a quadratic up to a_i, then a straight ramp falling on past the upper bound.

    The model built on the quadratic part is far too stiff on the ramp, so the line search
    extrapolates (1, 5, 21, ... times the step) until the boundary of the box stops it."""
    gen = _gen(seed)
    a = 1 + torch.rand(n, generator=gen, dtype=F64)
    w = 0.5 + torch.rand(n, generator=gen, dtype=F64)
    upper = 30 + 70 * torch.rand(n, generator=gen, dtype=F64)

    def fg(x):
        r = x - a
        quadratic = r <= 0
        f = torch.where(quadratic, 5 * r * r - r, -r)
        g = torch.where(quadratic, 10 * r - 1, -torch.ones_like(r))
        return float((w * f).sum()) + 100.0, w * g

    x0 = torch.rand(n, generator=gen, dtype=F64)
    return fg, x0, torch.zeros(n, dtype=F64), upper, 5


def negative_curvature():
    """-x0^2 + log cosh(x1 - 0.3) + 0.1 x1^2 on [-1, 1] x [-5, 5]: the first step runs x0 into its
    bound along a direction of negative curvature, so s.y < 0 and the pair is skipped."""

    def fg(x):
        f = -x[0] ** 2 + torch.log(torch.cosh(x[1] - 0.3)) + 0.1 * x[1] ** 2
        return float(f), torch.stack([-2 * x[0], torch.tanh(x[1] - 0.3) + 0.2 * x[1]])

    return (fg, torch.tensor([0.5, -0.2], dtype=F64), torch.tensor([-1.0, -5.0], dtype=F64),
            torch.tensor([1.0, 5.0], dtype=F64), 5)


def unbounded(n=20, seed=6):
    """No bound at all: plain L-BFGS (on Rosenbrock + 1, so that the optimum is not 0)."""
    x0 = torch.rand(n, generator=_gen(seed), dtype=F64) * 2 - 1

    def fg(x):
        f, g = _rosenbrock_fg(x)
        return f + 1.0, g

    return fg, x0, torch.full((n,), -INF, dtype=F64), torch.full((n,), INF, dtype=F64), 5


PROBLEMS = {
    "bounded_rosenbrock": bounded_rosenbrock,
    "nonnegative_least_squares": nonnegative_least_squares,
    "box_quadratic": box_quadratic,
    "logistic_in_a_box": logistic_in_a_box,
    "upper_bounds_only": upper_bounds_only,
    "infeasible_start": infeasible_start,
    "flat_far_optimum": flat_far_optimum,
    "ramp_past_the_box": ramp_past_the_box,
    "negative_curvature": negative_curvature,
    "unbounded": unbounded,
}
PGTOL, FACTR = 1e-7, 1.0  # tight, so both runs end at the same optimum


def _scipy(fg, x0, lower, upper, m):
    def fun(x):
        f, g = fg(torch.from_numpy(x.copy()))
        return f, g.numpy()

    bounds = [(None if math.isinf(lo) else lo, None if math.isinf(hi) else hi)
              for lo, hi in zip(lower.tolist(), upper.tolist())]
    return scipy.optimize.minimize(
        fun, x0.numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
        options=dict(maxcor=m, gtol=PGTOL, ftol=FACTR * float(np.finfo(float).eps), maxiter=15000, maxfun=15000),
    )


def _recording(fg, log):
    def recorded(x):
        f, g = fg(x)
        log.append(f)
        return f, g

    return recorded


def compare(name):
    """Both runs on one problem; each also returns the losses it evaluated, in order."""
    fg, x0, lower, upper, m = PROBLEMS[name]()
    our_losses, their_losses = [], []
    ours = minimize_lbfgsb(_recording(fg, our_losses), x0, lower, upper, m=m, pgtol=PGTOL, factr=FACTR)
    theirs = _scipy(_recording(fg, their_losses), x0, lower, upper, m)
    return ours, theirs, (lower, upper), (our_losses, their_losses)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_against_scipy(name):
    ours, theirs, (lower, upper), (our_losses, their_losses) = compare(name)
    x = ours.x
    assert bool(((x >= lower) & (x <= upper)).all()), "the final point leaves the box"
    assert abs(ours.f - theirs.fun) <= 1e-6 * abs(theirs.fun), (ours.f, theirs.fun)
    assert ours.projected_gradient <= 1e-5
    assert float(projected_gradient(x, ours.g, lower, upper).abs().max()) == ours.projected_gradient
    assert ours.n_eval <= 1.5 * theirs.nfev, (ours.n_eval, theirs.nfev)
    assert ours.n_eval == len(our_losses)
    assert ours.reason in ("projected_gradient", "function_change")
    assert theirs.message.startswith("CONVERGENCE")
    if name != "unbounded":
        assert int(((x == lower) | (x == upper)).sum()) > 0, "the bounds must bind for the problem to test them"
    # Same algorithm, same trial points: the first 20 losses agree to rounding (the runs part
    # only near the end, where steps are at the level of rounding errors).
    first = min(20, len(our_losses), len(their_losses))
    assert first == 20 or len(our_losses) == len(their_losses)
    for a, b in zip(our_losses[:first], their_losses[:first]):
        assert a == pytest.approx(b, rel=1e-9, abs=0)


@pytest.mark.parametrize("name", ["logistic_in_a_box", "flat_far_optimum", "ramp_past_the_box", "negative_curvature"])
def test_stops_on_the_projected_gradient(name):
    """Where the gradient stays large on the active bounds, only the projected gradient can stop the run."""
    ours, theirs, (lower, upper), _ = compare(name)
    assert ours.reason == "projected_gradient" and "PROJECTED GRADIENT" in theirs.message
    assert float(ours.g.abs().max()) > 1e3 * PGTOL


def test_start_is_projected_and_every_trial_is_feasible():
    fg, x0, lower, upper, m = infeasible_start()
    seen = []

    def recording(x):
        seen.append(x.clone())
        return fg(x)

    minimize_lbfgsb(recording, x0, lower, upper, m=m, pgtol=PGTOL, factr=FACTR)
    assert torch.equal(seen[0], project(x0, lower, upper))
    assert all(bool(((x >= lower) & (x <= upper)).all()) for x in seen)


def test_negative_curvature_pair_is_skipped():
    fg, x0, lower, upper, m = negative_curvature()
    result = minimize_lbfgsb(fg, x0, lower, upper, m=m, pgtol=PGTOL, factr=FACTR)
    assert result.skipped == 1
    assert result.x[0] == 1.0 and abs(float(result.g[1])) <= PGTOL  # x0 on its bound, x1 stationary


def test_iteration_and_evaluation_limits():
    fg, x0, lower, upper, m = bounded_rosenbrock()
    result = minimize_lbfgsb(fg, x0, lower, upper, m=m, max_iter=3)
    assert result.reason == "max_iter" and result.n_iter == 3
    calls = []
    result = minimize_lbfgsb(_recording(fg, calls), x0, lower, upper, m=m, max_eval=9)
    assert result.reason == "max_eval" and result.n_eval == len(calls) <= 9
    assert result.f == min(calls)  # the last accepted point is the best one seen


def test_bad_bounds():
    with pytest.raises(ValueError, match="lower > upper"):
        minimize_lbfgsb(_rosenbrock_fg, torch.rand(3, generator=_gen(11), dtype=F64),
                        torch.tensor([0.0, 1.0, 0.0], dtype=F64), 0.5)


# ----------------------------------------------------------------------------------
# The pieces


def _pairs(n, k, seed):
    """k pairs of a quadratic with Hessian A (s.y > 0), fresh random inputs."""
    gen = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    A = q @ torch.diag(torch.linspace(0.5, 4.0, n, dtype=F64)) @ q.T
    S = torch.randn(k, n, generator=gen, dtype=F64)
    return S, S @ A, gen


def _model(S, Y, m=None):
    model = CompactModel.empty(S.shape[1])
    for s, y in zip(S, Y):
        model = model.push(s, y, m or S.shape[0])
    return model


def test_compact_representation_is_the_bfgs_matrix():
    """theta I - W M W^T equals the BFGS updates of theta I applied pair by pair, oldest first (dense)."""
    n, m = 12, 5
    S, Y, _ = _pairs(n, 8, seed=10)
    model = _model(S, Y, m)  # 8 pushes into a memory of 5: the three oldest dropped
    assert model.k == m
    S, Y = S[-m:], Y[-m:]
    torch.testing.assert_close(model.SY, S @ Y.T, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(model.SS, S @ S.T, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(model.YY, Y @ Y.T, rtol=1e-14, atol=1e-12)
    theta = float(Y[-1].dot(Y[-1]) / S[-1].dot(Y[-1]))
    assert model.theta == pytest.approx(theta, rel=1e-15)
    B = theta * torch.eye(n, dtype=F64)
    for s, y in zip(S, Y):
        Bs = B @ s
        B = B - torch.outer(Bs, Bs) / s.dot(Bs) + torch.outer(y, y) / y.dot(s)
    torch.testing.assert_close(model.dense(), B, rtol=1e-10, atol=1e-10)
    # M is the inverse of the middle matrix (B4, B5).
    torch.testing.assert_close(model.middle() @ model.middle_inverse(), torch.eye(2 * m, dtype=F64),
                               rtol=0, atol=1e-9)
    # Secant condition on the newest pair.
    torch.testing.assert_close(model.dense() @ S[-1], Y[-1], rtol=1e-10, atol=1e-10)


def test_breakpoints_with_infinite_bounds():
    x = torch.tensor([0.5, 0.5, 0.5, 0.0, 1.0, 0.5, 2.0, 0.3, 0.0, 1.0], dtype=F64)
    g = torch.tensor([-2.0, 4.0, -1.0, 3.0, -1.0, 0.0, 1.5, 2.0, -1.0, 0.0], dtype=F64)
    lower = torch.tensor([0.0, -INF, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 0.0, -INF], dtype=F64)
    upper = torch.tensor([INF, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, INF, INF, 1.0], dtype=F64)
    t, d = breakpoints(x, g, lower, upper)
    expected_t = [
        INF,   # moving up, no upper bound
        INF,   # moving down, no lower bound
        0.5,   # moving up: (1 - 0.5) / 1
        0.0,   # on the lower bound, pushed out
        0.0,   # on the upper bound, pushed out
        INF,   # zero gradient inside
        0.0,   # lower = upper
        0.65,  # moving down to -1: (0.3 + 1) / 2
        INF,   # on the lower bound, moving in, no upper bound
        0.0,   # on the upper bound with a zero gradient: held there (not free)
    ]
    assert t.tolist() == pytest.approx(expected_t)
    assert d.tolist() == [2.0, -4.0, 1.0, 0.0, 0.0, -0.0, 0.0, -2.0, 1.0, 0.0]


def test_cauchy_point_by_hand():
    """x = (0.5, 0.5) in [0, 1]^2, g = (1, -2), B = 3 I (one pair s = e1, y = 3 e1).

    The path x - t g: variable 1 reaches 1 at t = 0.25 (the model's minimiser along
    (-1, 2) is at t = 5 / 15, past it); then only variable 0 moves, with f' = -1 + 3 * 0.25
    and f'' = 3: minimiser 1/12 later, at t = 1/3, inside the segment to t = 0.5.
    GCP = (0.5 - 1/3, 1) = (1/6, 1); variable 0 stays free.
    """
    x = torch.tensor([0.5, 0.5], dtype=F64)
    g = torch.tensor([1.0, -2.0], dtype=F64)
    lower, upper = torch.zeros(2, dtype=F64), torch.ones(2, dtype=F64)
    model = _model(torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[3.0, 0.0]], dtype=F64))
    torch.testing.assert_close(model.dense(), 3 * torch.eye(2, dtype=F64))
    for find in (generalized_cauchy_point, generalized_cauchy_point_parallel):
        cp = find(x, g, lower, upper, model)
        torch.testing.assert_close(cp.xcp, torch.tensor([1 / 6, 1.0], dtype=F64), rtol=0, atol=1e-15)
        assert cp.t == pytest.approx(1 / 3, rel=1e-15)
        assert cp.free.tolist() == [True, False]
        torch.testing.assert_close(cp.c, model.Wt(cp.xcp - x), rtol=0, atol=1e-15)
    # Without pairs (B = I) the model's minimiser lies past every breakpoint: the GCP is P(x - g).
    for find in (generalized_cauchy_point, generalized_cauchy_point_parallel):
        cp = find(x, g, lower, upper, CompactModel.empty(2))
        assert cp.xcp.tolist() == [0.0, 1.0] and cp.free.tolist() == [False, False]


def _dense_cauchy_point(x, g, lower, upper, B):
    """The first local minimiser of the model along P(x - t g), segment by segment with a dense B."""
    t, d = breakpoints(x, g, lower, upper)
    ends = sorted({v for v in t.tolist() if 0 < v < INF}) + [INF]
    start = 0.0
    for end in ends:
        x_start = project(x - start * g, lower, upper)
        dj = torch.where(t > start, d, torch.zeros_like(d))
        slope = float(g.dot(dj) + (x_start - x) @ B @ dj)
        curv = float(dj @ B @ dj)
        if curv <= 0:
            return x_start
        step = max(-slope / curv, 0.0)
        if step < end - start:
            return project(x - (start + step) * g, lower, upper)
        start = end
    return project(x - start * g, lower, upper)


@pytest.mark.parametrize("seed", [20, 21, 22, 23])
def test_cauchy_point_against_dense_model(seed):
    """Random models, boxes with infinite sides, starts on bounds: serial walk = dense = parallel form."""
    n, k = 30, 4
    S, Y, gen = _pairs(n, k, seed)
    model = _model(S, Y)
    lower = -torch.rand(n, generator=gen, dtype=F64)
    upper = torch.rand(n, generator=gen, dtype=F64)
    lower[::7], upper[3::7] = -INF, INF
    x = lower + (upper.clamp(max=5) - lower.clamp(min=-5)) * torch.rand(n, generator=gen, dtype=F64)
    x = torch.where(torch.isfinite(lower), x, upper.clamp(max=1) - torch.rand(n, generator=gen, dtype=F64))
    x[1::5] = lower[1::5].clamp(min=-1)  # some on a bound
    x = project(x, lower, upper)
    g = 3 * torch.randn(n, generator=gen, dtype=F64)
    dense = _dense_cauchy_point(x, g, lower, upper, model.dense())
    serial = generalized_cauchy_point(x, g, lower, upper, model)
    parallel = generalized_cauchy_point_parallel(x, g, lower, upper, model)
    assert serial.segments > 2  # the walk passes breakpoints
    torch.testing.assert_close(serial.xcp, dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(parallel.xcp, serial.xcp, rtol=0, atol=1e-12)
    assert torch.equal(parallel.free, serial.free)
    assert parallel.segments == serial.segments
    torch.testing.assert_close(serial.c, model.Wt(serial.xcp - x), rtol=0, atol=1e-11)
    torch.testing.assert_close(parallel.c, serial.c, rtol=0, atol=1e-11)


def test_subspace_step_solves_the_reduced_newton_system():
    """Bounds far away: z - xcp on the free variables is -(Z^T B Z)^{-1} Z^T (g + B (xcp - x)) (dense)."""
    n, k = 25, 5
    S, Y, gen = _pairs(n, k, seed=30)
    model = _model(S, Y)
    x = torch.randn(n, generator=gen, dtype=F64)
    g = torch.randn(n, generator=gen, dtype=F64)
    lower, upper = x - 50.0, x + 50.0
    lower[:6] = x[:6]  # six variables on their lower bound; those with g > 0 are held there
    cp = generalized_cauchy_point(x, g, lower, upper, model)
    assert 0 < int((~cp.free).sum()) < x.numel()
    z, how = subspace_minimization(x, g, lower, upper, cp, model)
    assert how == "interior"
    B, F = model.dense(), cp.free
    rhs = -(g + B @ (cp.xcp - x))[F]
    du = torch.linalg.solve(B[F][:, F], rhs)
    torch.testing.assert_close(z[F] - cp.xcp[F], du, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z[~F], cp.xcp[~F], rtol=0, atol=0)


def _small_box_case(seed):
    """x in [-1, 1]^3, a model of two pairs of a quadratic of condition 100, a random gradient."""
    n, gen = 3, _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    A = q @ torch.diag(torch.logspace(0, 2, n, dtype=F64)) @ q.T
    S = torch.randn(2, n, generator=gen, dtype=F64)
    model = _model(S, S @ A)
    x = torch.rand(n, generator=gen, dtype=F64) * 2 - 1
    g = torch.randn(n, generator=gen, dtype=F64)
    return model, x, g, -torch.ones(n, dtype=F64), torch.ones(n, dtype=F64)


# Seeds where the subspace step leaves the box: three keep the projection, three backtrack (rare).
PROJECTED_SEEDS, BACKTRACKED_SEEDS = (9, 14, 17), (186, 518, 1326)


@pytest.mark.parametrize("seed", PROJECTED_SEEDS + BACKTRACKED_SEEDS)
def test_subspace_step_projection_and_backtracking(seed):
    """Outside the box, the projected step is kept when it descends from x, else the step stops at the box."""
    model, x, g, lower, upper = _small_box_case(seed)
    cp = generalized_cauchy_point(x, g, lower, upper, model)
    z, how = subspace_minimization(x, g, lower, upper, cp, model)
    assert how == ("projected" if seed in PROJECTED_SEEDS else "backtracked")
    assert bool(((z >= lower) & (z <= upper)).all())
    F, B = cp.free, model.dense()
    du = torch.linalg.solve(B[F][:, F], -(g + B @ (cp.xcp - x))[F])  # the dense Newton step on F
    assert not bool(((cp.xcp[F] + du >= lower[F]) & (cp.xcp[F] + du <= upper[F])).all())
    projected = cp.xcp.clone()
    projected[F] = project(cp.xcp[F] + du, lower[F], upper[F])
    descent = float((projected - x).dot(g))
    if how == "projected":
        torch.testing.assert_close(z, projected, rtol=0, atol=1e-12)
        assert descent <= 0
    else:
        assert descent > 0
        alpha = max_step(cp.xcp[F], du, lower[F], upper[F], cap=1.0)
        assert 0 <= alpha < 1
        torch.testing.assert_close(z[F], cp.xcp[F] + alpha * du, rtol=0, atol=1e-12)
        assert float((z - x).dot(g)) < 0  # the backtracked point descends
    torch.testing.assert_close(z[~F], cp.xcp[~F], rtol=0, atol=0)
    assert bool(((z[F] == lower[F]) | (z[F] == upper[F])).any())


def _phi(t):
    """(t - 2)^2 + sin(3 t) / 3: slope at 0 = -3."""
    return (t - 2.0) ** 2 + math.sin(3 * t) / 3, 2 * (t - 2.0) + math.cos(3 * t)


def test_more_thuente_strong_wolfe_and_the_box():
    f0, g0 = _phi(0.0)
    point, evals, status = more_thuente(_phi, f0, g0, step=0.1, step_max=1e10)
    assert status == "converged" and evals >= 2  # 0.1 is too short: the search extrapolates
    assert point.f <= f0 + 1e-3 * point.t * g0 and abs(point.gtd) <= 0.9 * abs(g0)
    # The box ends the search at step_max, where the slope is still negative.
    point, evals, status = more_thuente(_phi, f0, g0, step=0.5, step_max=0.8)
    assert status == "warning" and point.t == 0.8 and point.gtd < 0
    # Sufficient decrease is f <= f0 + 1e-3 t g0: at t = 1, -t + 1.9985 t^2 - 0.999 t^3 has
    # decreased by 5e-4 only (enough for 1e-4), with slope 0: the search must go on.
    def cubic(t):
        return -t + 1.9985 * t * t - 0.999 * t**3, -1 + 3.997 * t - 2.997 * t * t

    point, evals, status = more_thuente(cubic, 0.0, -1.0, step=1.0, step_max=10.0)
    assert status == "converged" and evals > 1 and point.t < 1
    assert point.f <= 1e-3 * point.t * -1.0 and abs(point.gtd) <= 0.9
    # A first step far too long is cut back to a strong-Wolfe point.
    point, evals, status = more_thuente(_phi, f0, g0, step=40.0, step_max=1e10)
    assert status == "converged" and abs(point.gtd) <= 0.9 * abs(g0) and evals > 1


def test_more_thuente_backs_off_from_non_finite_values():
    def phi(t):  # (t - 2)^2 - 4 until t = 0.5, undefined beyond
        return ((t - 2.0) ** 2 - 4, 2 * (t - 2.0)) if t <= 0.5 else (math.nan, math.nan)

    point, evals, status = more_thuente(phi, 0.0, -4.0, step=1.0, step_max=1e10)
    assert status in ("converged", "warning") and math.isfinite(point.f) and 0 < point.t <= 0.5
    assert point.f <= 1e-3 * point.t * -4.0


def test_max_step_to_the_box():
    x = torch.tensor([0.0, 0.5, 1.0, 0.2], dtype=F64)
    d = torch.tensor([1.0, -1.0, 0.0, 1.0], dtype=F64)
    lower = torch.tensor([-INF, 0.0, 0.0, 0.0], dtype=F64)
    upper = torch.tensor([INF, 1.0, 1.0, 0.6], dtype=F64)
    assert max_step(x, d, lower, upper, cap=1e10) == pytest.approx(0.4)
    assert max_step(x, d, lower, upper, cap=0.1) == 0.1
    assert max_step(x, torch.tensor([1.0, 0, 0, 0], dtype=F64), lower, upper, cap=7.0) == 7.0
    # Already past the bound it moves towards (x is then outside the box): no step at all.
    assert max_step(torch.tensor([1.2], dtype=F64), torch.tensor([1.0], dtype=F64), torch.tensor([0.0], dtype=F64),
                    torch.tensor([1.0], dtype=F64), cap=5.0) == 0.0


def test_trial_points_stay_in_the_box_under_rounding():
    """x + t d at t = (u - x) / d can round past u (here by one unit in the last place)."""
    x, d, u = (torch.tensor([v], dtype=F64) for v in (-0.482, 1.274, 0.787))
    t = float((u - x) / d)
    assert float(x + t * d) > 0.787  # the rounding this guards against
    lower = torch.tensor([-1.0], dtype=F64)
    z = torch.tensor([0.5], dtype=F64)
    assert float(trial_point(x, d, z, t, lower, u)) == 0.787
    assert trial_point(x, d, z, 1.0, lower, u) is z


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"pgtol = {PGTOL}, factr = {FACTR} (scipy: gtol = pgtol, ftol = factr * eps), same maxcor\n")
    print(f"| problem | n | m | active bounds | objective rel. diff | projected gradient | evaluations (ours / scipy) | iterations (ours / scipy) | stop |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in PROBLEMS:
        ours, theirs, (lower, upper), _ = compare(name)
        rel = abs(ours.f - theirs.fun) / abs(theirs.fun)
        active = int(((ours.x == lower) | (ours.x == upper)).sum())
        m = PROBLEMS[name]()[4]
        print(f"| {name} | {ours.x.numel()} | {m} | {active} | {rel:.1e} | {ours.projected_gradient:.1e} | "
              f"{ours.n_eval} / {theirs.nfev} | {ours.n_iter} / {theirs.nit} | {ours.reason} |")
