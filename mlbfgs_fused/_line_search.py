"""Strong-Wolfe line search with cubic interpolation, on host scalars.

The search follows minFunc's ``WolfeLineSearch`` (Schmidt) as
``torch.optim.LBFGS`` runs it (sufficient-decrease constant ``c1``, curvature
constant ``c2``, a bracketing phase that extrapolates, then a zoom phase that
shrinks the bracket), so :class:`mlbfgs_fused.LBFGS` takes the same trial steps
and the same number of closure evaluations. It sees the objective only through
the callback ``evaluate(t) -> (f, gtd)``: the loss and the directional
derivative at ``x + t d``, two host numbers the optimizer reads in one
device-to-host copy per evaluation. No vector lives here.

Two differences from torch's, both at points torch would mishandle:
- ``max_evals`` counts every evaluation, the first trial included, so the
  optimizer's ``max_eval`` holds exactly (torch allows one more).
- A trial whose loss or derivative is not finite fails the sufficient-decrease
  test (its loss counts as ``+inf``) and the next trial bisects the bracket, so
  the search backs off towards the last good point instead of interpolating NaN.

The gradient at the point finally returned must still be at hand after later
trials have overwritten ``.grad``; the search calls ``keep(point)`` before an
evaluation would overwrite the gradient of a point it may still return (the
optimizer copies that gradient once), and the returned :class:`Point` says
which evaluation it came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Point:
    """An evaluated step length: ``index`` 0 is the start (``t = 0``), k the k-th trial."""

    t: float
    f: float
    gtd: float
    index: int


def _cubic_interpolate(
    x1: float, f1: float, g1: float, x2: float, f2: float, g2: float, bounds: tuple[float, float] | None = None
) -> float:
    """The minimiser of the cubic through ``(x1, f1)`` and ``(x2, f2)`` with slopes
    ``g1``, ``g2``, clamped to ``bounds`` (default: the interval between the points).

    When the cubic has no minimiser (negative discriminant, or a flat cubic: the
    formula's denominator is zero, where torch's tensors would give a NaN step), the two
    points coincide or an input is not finite, the middle of the bounds.
    """
    lo, hi = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    if x1 == x2 or not all(map(math.isfinite, (x1, f1, g1, x2, f2, g2))):
        return (lo + hi) / 2.0
    # Written from the farther point: with a = g1 + g2 - 3 (f1 - f2) / (x1 - x2)
    # and b = sqrt(a^2 - g1 g2), the stationary point of the cubic that is a
    # minimum lies at x2 - (x2 - x1) (g2 + b - a) / (g2 - g1 + 2 b).
    a = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    disc = a * a - g1 * g2
    if disc < 0:
        return (lo + hi) / 2.0
    b = math.sqrt(disc)
    denominator = (g2 - g1 + 2 * b) if x1 <= x2 else (g1 - g2 + 2 * b)
    if denominator == 0:
        return (lo + hi) / 2.0
    if x1 <= x2:
        x = x2 - (x2 - x1) * ((g2 + b - a) / denominator)
    else:
        x = x1 - (x1 - x2) * ((g1 + b - a) / denominator)
    return min(max(x, lo), hi)


def _strong_wolfe(
    evaluate: Callable[[float], tuple[float, float]],
    keep: Callable[[Point], None],
    f0: float,
    gtd0: float,
    t: float,
    d_norm: float | Callable[[], float],
    max_evals: int,
    c1: float = 1e-4,
    c2: float = 0.9,
    tolerance_change: float = 1e-9,
) -> tuple[Point, int]:
    """Search along a descent direction from the point with loss ``f0`` and slope ``gtd0 < 0``.

    Args:
        evaluate: runs the closure at step ``t``; returns the loss and the slope
            there (``inf``/``nan`` for a failed evaluation).
        keep: saves the gradient of the most recently evaluated point.
        t: first trial step.
        d_norm: ``max |d|``, to turn a bracket width into a parameter change (or a
            callable giving it, asked after the first evaluation).
        max_evals: evaluations allowed, at least 1.

    Returns the accepted point and the number of evaluations made.
    """
    start = Point(0.0, f0, gtd0, 0)
    evals = 0

    def trial(step: float) -> Point:
        nonlocal evals
        evals += 1
        f, gtd = evaluate(step)
        if not (math.isfinite(f) and math.isfinite(gtd)):
            f, gtd = math.inf, math.nan
        return Point(step, f, gtd, evals)

    def sufficient_decrease(p: Point) -> bool:
        return p.f <= f0 + c1 * p.t * gtd0

    def curvature_met(p: Point) -> bool:
        return abs(p.gtd) <= -c2 * gtd0

    # Phase 1: grow the step until an interval [prev, new] must hold an acceptable point.
    prev, new = start, trial(t)
    while evals < max_evals:
        if not sufficient_decrease(new) or (evals > 2 and new.f >= prev.f):
            bracket = [prev, new]
            break
        if curvature_met(new):
            return new, evals
        if new.gtd >= 0:
            bracket = [prev, new]
            break
        # Still descending: extrapolate, between just past the current step and ten times it.
        step = _cubic_interpolate(
            prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd,
            bounds=(new.t + 0.01 * (new.t - prev.t), new.t * 10),
        )
        keep(new)  # `new` becomes `prev`: it may end up the answer
        prev, new = new, trial(step)
    else:
        # Out of evaluations before the last trial was judged.
        bracket = [start, new]

    # Phase 2: shrink the bracket. `low` is the end with the lower loss (the first on a tie).
    low = 0 if bracket[0].f <= bracket[1].f else 1
    near_edge_before = False
    while evals < max_evals:
        a, b = bracket
        if abs(b.t - a.t) * (d_norm() if callable(d_norm) else d_norm) < tolerance_change:
            break
        step = _cubic_interpolate(a.t, a.f, a.gtd, b.t, b.f, b.gtd)
        left, right = min(a.t, b.t), max(a.t, b.t)
        margin = 0.1 * (right - left)
        if min(right - step, step - left) < margin:
            # Too close to an end: accept once, but the second time in a row (or
            # when on or outside an end) move a tenth of the width inside.
            if near_edge_before or step >= right or step <= left:
                step = right - margin if abs(step - right) < abs(step - left) else left + margin
                near_edge_before = False
            else:
                near_edge_before = True
        else:
            near_edge_before = False

        if bracket[low].index == evals and evals > 0:
            keep(bracket[low])  # the low end's gradient is about to be overwritten
        new = trial(step)
        high = 1 - low
        if not sufficient_decrease(new) or new.f >= bracket[low].f:
            bracket[high] = new
            low = 0 if bracket[0].f <= bracket[1].f else 1
        else:
            if curvature_met(new):
                bracket[low] = new
                return new, evals
            if new.gtd * (bracket[high].t - bracket[low].t) >= 0:
                bracket[high] = bracket[low]
            bracket[low] = new
    return bracket[low], evals
