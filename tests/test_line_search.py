"""The strong-Wolfe line search on its own: against torch's, on cases worked by hand, at its limits."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.optim.lbfgs import _cubic_interpolate as torch_cubic
from torch.optim.lbfgs import _strong_wolfe as torch_strong_wolfe

from mlbfgs_fused._line_search import _cubic_interpolate, _strong_wolfe


def test_cubic_interpolation_finds_a_cubics_minimum():
    # phi(t) = t^3 - 3 t: phi(0) = 0, phi'(0) = -3, phi(2) = 2, phi'(2) = 9; minimum at t = 1.
    assert _cubic_interpolate(0.0, 0.0, -3.0, 2.0, 2.0, 9.0) == pytest.approx(1.0, rel=1e-15)
    assert _cubic_interpolate(2.0, 2.0, 9.0, 0.0, 0.0, -3.0) == pytest.approx(1.0, rel=1e-15)
    assert _cubic_interpolate(0.0, 0.0, -3.0, 2.0, 2.0, 9.0, bounds=(1.5, 3.0)) == 1.5
    # No minimiser (discriminant < 0), coinciding points or a non-finite value: the middle.
    assert _cubic_interpolate(0.0, 0.0, 2.0, 1.0, 1.9, 2.0) == 0.5
    assert _cubic_interpolate(1.0, 0.0, -1.0, 1.0, 0.0, 1.0, bounds=(0.0, 4.0)) == 2.0
    assert _cubic_interpolate(0.0, 0.0, -1.0, 1.0, math.inf, math.nan) == 0.5
    # A flat cubic (equal values, zero slopes): the formula divides 0 by 0 (torch's tensors
    # give a NaN step there), so the middle, from either side.
    assert _cubic_interpolate(0.0, 1.5, 0.0, 2.0, 1.5, 0.0) == 1.0
    assert _cubic_interpolate(2.0, 1.5, 0.0, 0.0, 1.5, 0.0, bounds=(0.0, 3.0)) == 1.5


def test_cubic_interpolation_matches_torch():
    rng = random.Random(0)
    for _ in range(200):
        x1, x2 = rng.uniform(-2, 2), rng.uniform(-2, 2)
        f1, f2, g1, g2 = (rng.uniform(-3, 3) for _ in range(4))
        ours = _cubic_interpolate(x1, f1, g1, x2, f2, g2)
        theirs = torch_cubic(x1, f1, torch.tensor(g1, dtype=torch.float64), x2, f2, torch.tensor(g2, dtype=torch.float64))
        assert ours == pytest.approx(float(theirs), rel=1e-12, abs=1e-15)


def _line(kind: str):
    """A function of one variable along d = 1 from x = 0, with its derivative."""
    if kind == "quadratic":
        return lambda x: (3 * (x - 0.2) ** 2, 6 * (x - 0.2))
    if kind == "steep":
        return lambda x: (math.exp(4 * x) - 9 * x, 4 * math.exp(4 * x) - 9)
    if kind == "far":
        return lambda x: ((x - 40.0) ** 2 / 100, (x - 40.0) / 50)
    if kind == "wiggly":
        return lambda x: (0.1 * x * x - math.sin(3 * x), 0.2 * x - 3 * math.cos(3 * x))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["quadratic", "steep", "far", "wiggly"])
@pytest.mark.parametrize("t0", [1.0, 0.05, 7.0])
def test_strong_wolfe_matches_torch(kind, t0):
    phi = _line(kind)
    f0, g0 = phi(0.0)

    def obj_func(x, t, d):
        f, g = phi(float(x[0] + t * d[0]))
        return f, torch.tensor([g], dtype=torch.float64)

    x, d = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    g = torch.tensor([g0], dtype=torch.float64)
    f_t, _, t_t, evals_t = torch_strong_wolfe(obj_func, [x], t0, d, f0, g, g.dot(d), max_ls=25)
    point, evals = _strong_wolfe(lambda t: phi(t), lambda p: None, f0, g0, t0, 1.0, max_evals=26)
    assert evals == evals_t
    assert point.t == pytest.approx(float(t_t), rel=1e-12)
    assert point.f == pytest.approx(float(f_t), rel=1e-12)


@pytest.mark.parametrize("kind", ["quadratic", "steep", "far", "wiggly"])
def test_accepted_point_meets_the_strong_wolfe_conditions(kind):
    phi = _line(kind)
    f0, g0 = phi(0.0)
    point, _ = _strong_wolfe(phi, lambda p: None, f0, g0, 1.0, 1.0, max_evals=50, c1=1e-4, c2=0.9)
    f, g = phi(point.t)
    assert f <= f0 + 1e-4 * point.t * g0
    assert abs(g) <= 0.9 * abs(g0)


def test_max_evals_counts_every_evaluation():
    phi = _line("far")
    f0, g0 = phi(0.0)
    for budget in (1, 2, 3):
        calls = []
        point, evals = _strong_wolfe(lambda t: (calls.append(t), phi(t))[1], lambda p: None, f0, g0, 0.01, 1.0, budget)
        assert evals == len(calls) == budget
        assert point.f <= f0


def test_non_finite_trials_back_off_and_the_answer_is_kept():
    # NaN beyond t = 0.5; the minimum along the line is at t = 0.3.
    def phi(t):
        return (math.nan, math.nan) if t > 0.5 else ((t - 0.3) ** 2, 2 * (t - 0.3))

    f0, g0 = phi(0.0)
    kept, calls = [], []

    def evaluate(t):
        calls.append(t)
        return phi(t)

    point, evals = _strong_wolfe(evaluate, lambda p: kept.append(p.index), f0, g0, 1.0, 1.0, 25)
    assert math.isfinite(point.f) and point.t <= 0.5
    assert abs(phi(point.t)[1]) <= 0.9 * abs(g0)
    assert any(not math.isfinite(phi(t)[0]) for t in calls)
    # The answer's gradient is either the latest evaluation's or one the search asked to keep.
    assert point.index == evals or (kept and kept[-1] == point.index)
