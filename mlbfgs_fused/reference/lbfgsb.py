"""Float64 ground truth of L-BFGS-B: L-BFGS with bounds ``lower <= x <= upper``.

The algorithm of Byrd, Lu, Nocedal and Zhu, "A limited memory algorithm for bound
constrained optimization" (SIAM J. Sci. Comput. 16(5), 1995), as L-BFGS-B 3.0 runs it
(Morales and Nocedal, "Remark on Algorithm 778", ACM TOMS 38(1), 2011). Each iteration:

1. the generalized Cauchy point (GCP): the first local minimiser of the quadratic
   model along the projected steepest-descent path ``P(x - t g)``, found by walking
   the breakpoints of the path (:func:`generalized_cauchy_point`; every segment at
   once in :func:`generalized_cauchy_point_parallel`, the form a device runs);
2. the subspace minimisation: the model minimised over the variables still free at
   the GCP by the direct primal method, then projected back into the box, or
   backtracked towards the GCP when the projected point is not a descent direction
   (the 2011 remark; :func:`subspace_minimization`);
3. a line search along ``d = z - x`` that keeps every trial point in the box: the
   Moré-Thuente search on ``[0, step_max]`` (strong Wolfe where the box allows,
   :func:`more_thuente`);
4. the pair ``(s, y)`` enters the memory unless ``s.y <= eps * (-g.s)``;
5. it stops on the projected gradient, ``||P(x - g) - x||_inf <= pgtol``, or on the
   relative decrease of ``f`` (``factr``).

docs/design.md, "L-BFGS-B (bound constraints)", derives every formula; the
comments cite its equations (B1) to (B22).

Written against the data the package already keeps, so that the optimizer can
compute the same quantities on its own state: the model is the compact
representation ``B = theta I - W M W^T`` (``W = [Y^T, theta S^T]``), and ``theta``,
``M`` and every ``2k``-vector product with ``M`` use only the history's Gram
blocks ``S S^T``, ``S Y^T``, ``Y Y^T`` (the blocks of the package's ``gram``,
docs/design.md, "Gram matrices"; here in recency order, oldest pair first,
where the package keeps slot order, "Ring convention"). The vectors enter only
through products with the ring, ``W^T v`` (``[Y v; theta S v]``) and ``W a``, the
rows of ``W`` at the breakpoints, and the same Gram blocks over the free
variables only (one masked product of the ring with itself).

Readable first: out of place, whole ``[n]`` float64 tensors, the breakpoint walk
a Python loop. ``lower``/``upper`` may hold ``-inf``/``+inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._line_search import Point

__all__ = [
    "CauchyPoint",
    "CompactModel",
    "LBFGSBResult",
    "breakpoints",
    "generalized_cauchy_point",
    "generalized_cauchy_point_parallel",
    "max_step",
    "minimize_lbfgsb",
    "more_thuente",
    "project",
    "projected_gradient",
    "subspace_minimization",
    "trial_point",
]

EPS = torch.finfo(torch.float64).eps
STEP_MAX_UNBOUNDED = 1e10  # the line search's largest step when no bound limits it


# ----------------------------------------------------------------------------------
# The box


def project(x: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``P(x)``: the nearest point of the box, componentwise (B1)."""
    return torch.minimum(torch.maximum(x, lower), upper)


def projected_gradient(x: Tensor, g: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """``P(x - g) - x``; its infinity norm is the first-order optimality measure (B21)."""
    return project(x - g, lower, upper) - x


def trial_point(x: Tensor, d: Tensor, z: Tensor, t: float, lower: Tensor, upper: Tensor) -> Tensor:
    """The line search's point at step ``t``: ``z`` itself at ``t = 1``, else ``P(x + t d)``.

    ``t <= step_max`` keeps ``x + t d`` in the box; the projection only absorbs the
    rounding of ``x + t d`` at ``t = step_max`` (B18).
    """
    return z if t == 1.0 else project(x + t * d, lower, upper)


def max_step(x: Tensor, d: Tensor, lower: Tensor, upper: Tensor, cap: float) -> float:
    """The largest ``a`` in ``[0, cap]`` with ``lower <= x + a d <= upper`` (B17, B18).

    A variable already on (or past) the bound it moves towards gives 0.
    """
    down = (d < 0) & torch.isfinite(lower)
    up = (d > 0) & torch.isfinite(upper)
    room = torch.where(down, lower - x, torch.where(up, upper - x, torch.zeros_like(x)))
    limited = down | up
    if not bool(limited.any()):
        return cap
    ratio = room[limited] / d[limited]
    return min(cap, max(0.0, float(ratio.min())))


# ----------------------------------------------------------------------------------
# The compact representation (B2)-(B5)


@dataclass(frozen=True)
class CompactModel:
    """The L-BFGS memory as the compact representation ``B = theta I - W M W^T`` (B3).

    ``S``, ``Y``: ``[k, n]``, oldest pair first. ``SS = S S^T``, ``SY = S Y^T``
    (``SY[i, j] = s_i . y_j``), ``YY = Y Y^T``: the Gram blocks, updated one row and
    column per pushed pair, as the package updates its ``gram``.
    """

    S: Tensor
    Y: Tensor
    SS: Tensor
    SY: Tensor
    YY: Tensor

    @staticmethod
    def empty(n: int) -> "CompactModel":
        z = torch.zeros(0, n, dtype=torch.float64)
        e = torch.zeros(0, 0, dtype=torch.float64)
        return CompactModel(z, z, e, e, e)

    @property
    def k(self) -> int:
        return self.S.shape[0]

    @property
    def theta(self) -> float:
        """``B0 = theta I``: ``y.y / s.y`` of the newest pair, 1 without pairs (B2)."""
        if self.k == 0:
            return 1.0
        return float(self.YY[-1, -1] / self.SY[-1, -1])

    def push(self, s: Tensor, y: Tensor, m: int) -> "CompactModel":
        """The model with ``(s, y)`` appended (the oldest pair dropped beyond ``m``)."""
        S, Y = torch.cat([self.S, s[None]]), torch.cat([self.Y, y[None]])
        # One new row and column of each Gram block: the new pair against the ring.
        ss, sy, ys, yy = S @ s, S @ y, Y @ s, Y @ y  # sy[i] = s_i . y_new, ys[i] = y_i . s_new
        SS = _grow(self.SS, ss, ss)
        SY = _grow(self.SY, sy, ys)  # new column s_i . y_new, new row s_new . y_j
        YY = _grow(self.YY, yy, yy)
        if S.shape[0] > m:
            S, Y, SS, SY, YY = S[1:], Y[1:], SS[1:, 1:], SY[1:, 1:], YY[1:, 1:]
        return CompactModel(S, Y, SS, SY, YY)

    def middle_inverse(self) -> Tensor:
        """``M^{-1} = [[-D, L^T], [L, theta S S^T]]`` (B4), from ``SS`` and ``SY``."""
        D = torch.diag(torch.diagonal(self.SY))
        L = torch.tril(self.SY, diagonal=-1)
        return torch.cat([torch.cat([-D, L.T], 1), torch.cat([L, self.theta * self.SS], 1)], 0)

    def middle(self) -> Tensor:
        """``M`` by the Schur complement ``T = theta S S^T + L D^{-1} L^T`` of ``-D`` (B5).

        ``T`` is positive definite when every held pair has ``s.y > 0``; its Cholesky
        factor is what the optimizer keeps. Raises ``torch.linalg.LinAlgError``
        when it is not (the caller drops the memory, as L-BFGS-B does).
        """
        Dinv = torch.diag(1.0 / torch.diagonal(self.SY))
        L = torch.tril(self.SY, diagonal=-1)
        T = self.theta * self.SS + L @ Dinv @ L.T
        J = torch.linalg.cholesky(T)
        Tinv = torch.cholesky_inverse(J)
        A = Dinv @ L.T @ Tinv  # D^{-1} L^T T^{-1}
        return torch.cat([torch.cat([-Dinv + A @ L @ Dinv, A], 1), torch.cat([A.T, Tinv], 1)], 0)

    def Wt(self, v: Tensor) -> Tensor:
        """``W^T v = [Y v; theta S v]`` (``2k``): one product of the ring with ``v``."""
        return torch.cat([self.Y @ v, self.theta * (self.S @ v)])

    def W(self, a: Tensor) -> Tensor:
        """``W a = Y^T a_Y + theta S^T a_S`` (``n``)."""
        return self.Y.T @ a[: self.k] + self.theta * (self.S.T @ a[self.k:])

    def W_rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` of ``W`` (``[len(index), 2k]``): the ring's columns at those variables."""
        return torch.cat([self.Y[:, index].T, self.theta * self.S[:, index].T], 1)

    def free_gram(self, free: Tensor) -> Tensor:
        """``W_F^T W_F`` (``2k x 2k``) from the Gram blocks over the free variables (B15)."""
        SF, YF = self.S[:, free], self.Y[:, free]
        SS_F, SY_F, YY_F = SF @ SF.T, SF @ YF.T, YF @ YF.T
        t = self.theta
        return torch.cat([torch.cat([YY_F, t * SY_F.T], 1), torch.cat([t * SY_F, t * t * SS_F], 1)], 0)

    def dense(self) -> Tensor:
        """``B`` itself (``[n, n]``, tests only)."""
        n = self.S.shape[1]
        if self.k == 0:
            return torch.eye(n, dtype=torch.float64)
        W = torch.cat([self.Y.T, self.theta * self.S.T], 1)
        return self.theta * torch.eye(n, dtype=torch.float64) - W @ self.middle() @ W.T


def _grow(G: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """``G`` bordered by a new last column ``col`` and last row ``row`` (``row[-1]`` on the diagonal)."""
    k = G.shape[0]
    out = torch.empty(k + 1, k + 1, dtype=G.dtype)
    out[:k, :k] = G
    out[:, k] = col
    out[k, :] = row
    return out


# ----------------------------------------------------------------------------------
# The generalized Cauchy point (B7)-(B13)


def breakpoints(x: Tensor, g: Tensor, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The breakpoints ``t`` of the path ``x(t) = P(x - t g)`` and its first direction ``d`` (B7, B8).

    ``t_i`` is where variable ``i`` reaches the bound it moves towards: ``inf`` when
    that bound is infinite or ``g_i = 0`` inside the box; 0 when it cannot move: on a
    bound with ``g_i`` pointing out of the box or zero (a variable with
    ``lower_i = upper_i`` is on both, so it never moves).
    ``d_i = -g_i`` where ``t_i > 0``, else 0.
    """
    inf = torch.full_like(x, math.inf)
    t = torch.where(g < 0, (x - upper) / g, torch.where(g > 0, (x - lower) / g, inf))  # inf past an infinite bound
    held = ((x <= lower) & (g >= 0)) | ((x >= upper) & (g <= 0))
    t = torch.where(held, torch.zeros_like(t), t)
    d = torch.where(t > 0, -g, torch.zeros_like(g))
    return t, d


@dataclass
class CauchyPoint:
    """The GCP ``xcp``, ``c = W^T (xcp - x)`` (``2k``), the variables ``free`` there, and the path time ``t``."""

    xcp: Tensor
    c: Tensor
    free: Tensor
    t: float
    segments: int


def generalized_cauchy_point(x: Tensor, g: Tensor, lower: Tensor, upper: Tensor,
                             model: CompactModel) -> CauchyPoint:
    """Algorithm CP of Byrd et al. (1995, section 4): walk the breakpoints in increasing order.

    On each segment of the path the model is a quadratic in the step; its
    derivatives at the start of the segment are ``f1 = f'`` and ``f2 = f''`` (B9,
    B10). The GCP lies in the first segment whose minimiser ``-f1 / f2`` falls
    before the segment's end (B11); passing a breakpoint fixes one variable and
    updates ``f1``, ``f2``, ``p = W^T d`` and ``c = W^T z`` in ``O(k^2)`` (B12).
    """
    k2 = 2 * model.k
    theta = model.theta
    M = model.middle() if model.k else torch.zeros(0, 0, dtype=torch.float64)
    t, d = breakpoints(x, g, lower, upper)
    if not bool((d != 0).any()):  # the projected gradient is zero: x is the GCP
        return CauchyPoint(x.clone(), torch.zeros(k2, dtype=torch.float64), t > 0, 0.0, 0)

    # Step 1: the first segment (B9, B10 with z = 0).
    p = model.Wt(d)                           # W^T d
    c = torch.zeros(k2, dtype=torch.float64)  # W^T (x(t) - x)
    dd = float(d.dot(d))
    f1 = -dd                                  # g^T d
    f2 = theta * dd - float(p @ M @ p)        # d^T B d
    f2_first = f2
    dt_min = -f1 / f2

    xcp = x.clone()
    free = t > 0
    moving = d.clone()
    order = torch.argsort(t, stable=True)
    finite = order[(t[order] > 0) & torch.isfinite(t[order])]
    t_start, segments = 0.0, 1
    for b in finite.tolist():
        # Step 2: the minimiser lies in this segment: stop (B11).
        dt = float(t[b]) - t_start
        if dt_min < dt:
            break
        # Step 3: pass the breakpoint: variable b reaches its bound and stops (B12).
        d_b = float(moving[b])
        xcp[b] = upper[b] if d_b > 0 else lower[b]
        z_b = float(xcp[b] - x[b])
        moving[b] = 0.0
        free[b] = False
        c = c + dt * p
        f1 = f1 + dt * f2 + d_b * d_b - theta * d_b * z_b
        f2 = f2 - theta * d_b * d_b
        if model.k:
            w_b = model.W_rows(torch.tensor([b]))[0]
            Mw = M @ w_b
            f1 = f1 + d_b * float(Mw @ c)
            f2 = f2 + 2.0 * d_b * float(Mw @ p) - d_b * d_b * float(Mw @ w_b)
            p = p - d_b * w_b
        f2 = max(EPS * f2_first, f2)  # B is positive definite, so f'' > 0: a floor against rounding
        dt_min = -f1 / f2
        t_start = float(t[b])
        segments += 1
    else:
        # Every breakpoint passed: the last segment is unbounded, or nothing moves any more.
        if not bool((moving != 0).any()):
            dt_min = 0.0

    # Step 4: the GCP and c = W^T (xcp - x) (B11).
    dt_min = max(dt_min, 0.0)
    t_c = t_start + dt_min
    xcp = torch.where(moving != 0, project(x + t_c * moving, lower, upper), xcp)
    c = c + dt_min * p
    return CauchyPoint(xcp, c, free, t_c, segments)


def generalized_cauchy_point_parallel(x: Tensor, g: Tensor, lower: Tensor, upper: Tensor,
                                      model: CompactModel) -> CauchyPoint:
    """The same point with every segment evaluated at once (B13): the form a device runs.

    After sorting the breakpoints, the derivatives ``f'_j``, ``f''_j`` at the start of
    every segment ``j`` are closed forms of prefix sums over the breakpoints already
    passed (their ``d_b^2``, ``d_b w_b`` and ``z_b w_b``); the GCP is in the first
    segment whose minimiser falls inside it. No serial walk, no value read by a host:
    one sort, one gather of ``W``'s rows at the breakpoints, prefix sums over
    ``[K, 2k]``, and ``K`` quadratic forms with ``M``. Agrees with
    :func:`generalized_cauchy_point` up to rounding (its ``f''`` floor is applied per
    segment rather than carried along).
    """
    theta = model.theta
    M = model.middle() if model.k else torch.zeros(0, 0, dtype=torch.float64)
    t, d = breakpoints(x, g, lower, upper)
    order = torch.argsort(t, stable=True)
    order = order[(t[order] > 0) & torch.isfinite(t[order])]  # the K breakpoints, in path order
    K = order.numel()
    t_b = t[order]
    d_b = d[order]
    z_b = torch.where(d_b > 0, upper[order], lower[order]) - x[order]
    w_b = model.W_rows(order)                                       # [K, 2k]

    def before(v: Tensor) -> Tensor:  # sums over the breakpoints passed before segment j = 0..K
        return torch.cat([torch.zeros_like(v[:1]), torch.cumsum(v, 0)])

    t_start = torch.cat([torch.zeros(1, dtype=torch.float64), t_b])  # [K + 1]
    dd = float(d.dot(d)) - before(d_b * d_b)                          # ||d^j||^2
    p = model.Wt(d)[None, :] - before(d_b[:, None] * w_b)             # W^T d^j      [K + 1, 2k]
    c = t_start[:, None] * p + before(z_b[:, None] * w_b)             # W^T z^j
    f1 = -dd + theta * t_start * dd - ((p @ M) * c).sum(1)            # (B9)
    f2 = theta * dd - ((p @ M) * p).sum(1)                            # (B10)
    f2 = torch.maximum(f2, EPS * f2[:1])
    dt_min = -f1 / f2
    seg_len = torch.cat([t_b - t_start[:-1], torch.full((1,), math.inf, dtype=torch.float64)])
    inside = dt_min < seg_len
    j = int(torch.argmax(inside.to(torch.int8)))                      # the first such segment (the last always is)
    # Past the last breakpoint: the minimiser of an unbounded last segment, or 0 when nothing moves.
    unbounded = bool(((d != 0) & torch.isinf(t)).any())
    dt = max(float(dt_min[j]), 0.0) if (j < K or unbounded) else 0.0
    t_c = float(t_start[j]) + dt

    passed = torch.zeros_like(x, dtype=torch.bool)
    passed[order[:j]] = True
    at_bound = torch.where(d > 0, upper, lower)
    xcp = torch.where(passed, at_bound, torch.where(d != 0, project(x + t_c * d, lower, upper), x))
    return CauchyPoint(xcp, c[j] + dt * p[j], (t > 0) & ~passed, t_c, j + 1)


# ----------------------------------------------------------------------------------
# Subspace minimisation (B14)-(B17)


def subspace_minimization(x: Tensor, g: Tensor, lower: Tensor, upper: Tensor, cp: CauchyPoint,
                          model: CompactModel) -> tuple[Tensor, str]:
    """The point ``z`` the line search aims at, and how it was found.

    The direct primal method of Byrd et al. (1995, section 5.1): minimise the model
    over the free variables ``F`` with the others held at the GCP. The reduced
    gradient is ``r`` (B14), the reduced matrix ``theta I - W_F M W_F^T``, whose
    inverse the Sherman-Morrison-Woodbury formula gives through the ``2k x 2k``
    matrix ``K = M^{-1} - W_F^T W_F / theta`` (B15). Then the 2011 remark: project
    ``xcp + du`` into the box (B16); keep it when no free variable reaches a bound or
    when it is still a descent direction from ``x``; otherwise backtrack along
    ``du`` from the GCP to the box's boundary (B17).

    Returns ``(z, how)``, ``how`` one of ``"cauchy"`` (no subspace step: no pair or no
    free variable), ``"interior"``, ``"projected"``, ``"backtracked"``.
    """
    F = cp.free
    if model.k == 0 or not bool(F.any()):
        return cp.xcp, "cauchy"
    theta = model.theta
    M = model.middle()
    # (B14) r = -Z^T (g + B (xcp - x)), with B (xcp - x) = theta (xcp - x) - W M c.
    r = -(g + theta * (cp.xcp - x) - model.W(M @ cp.c))[F]
    # (B15) du = r / theta + W_F K^{-1} W_F^T r / theta^2.
    K = model.middle_inverse() - model.free_gram(F) / theta
    W_F = model.W_rows(F.nonzero().flatten())      # [|F|, 2k]
    du = r / theta + W_F @ torch.linalg.solve(K, W_F.T @ r) / theta**2
    # (B16) Project back into the box.
    lo, hi = lower[F], upper[F]
    z = cp.xcp.clone()
    z[F] = project(cp.xcp[F] + du, lo, hi)
    on_bound = bool(((z[F] == lo) | (z[F] == hi)).any())
    if not on_bound:
        return z, "interior"
    if float((z - x).dot(g)) <= 0.0:
        return z, "projected"
    # (B17) Not a descent direction: the longest feasible step towards xcp + du instead.
    alpha = max_step(cp.xcp[F], du, lo, hi, cap=1.0)
    z = cp.xcp.clone()
    z[F] = project(cp.xcp[F] + alpha * du, lo, hi)
    return z, "backtracked"


# ----------------------------------------------------------------------------------
# The line search (B18)-(B19): Moré and Thuente (1994), with the step capped by the box


def _cubic_step(a: float, fa: float, ga: float, b: float, fb: float, gb: float,
                clip: bool = False) -> tuple[float, float]:
    """``(r, gamma)``: the minimiser of the cubic through ``(a, fa, ga)`` and ``(b, fb, gb)``
    is ``a + r (b - a)``. ``clip`` floors the discriminant at 0 (the cubic then may have no minimiser:
    ``gamma = 0``)."""
    theta = 3.0 * (fa - fb) / (b - a) + ga + gb
    s = max(abs(theta), abs(ga), abs(gb))
    disc = (theta / s) ** 2 - (ga / s) * (gb / s)
    gamma = s * math.sqrt(max(0.0, disc) if clip else disc)
    if b < a:
        gamma = -gamma
    p = (gamma - ga) + theta
    q = ((gamma - ga) + gamma) + gb
    return p / q, gamma


def _trial_step(best, other, trial, bracketed: bool, lo: float, hi: float):
    """One safeguarded interpolation step of Moré and Thuente (1994, section 4).

    ``best = (t, f, g)`` has the least ``f`` so far, ``other`` is the other end of the
    interval of uncertainty, ``trial`` the point just evaluated; ``[lo, hi]`` bounds the
    next step. Returns the new ``best``, ``other``, next step and ``bracketed``.
    """
    (tx, fx, gx), (ty, fy, gy), (tp, fp, gp) = best, other, trial
    opposite = gx != 0 and gp * math.copysign(1.0, gx) < 0  # slopes of opposite signs
    if fp > fx:
        # Case 1: higher f: a minimiser is bracketed. The cubic step if closer to tx than
        # the quadratic one (f at both ends, slope at tx), else their average.
        r, _ = _cubic_step(tx, fx, gx, tp, fp, gp)
        cubic = tx + r * (tp - tx)
        quad = tx + (gx / ((fx - fp) / (tp - tx) + gx)) / 2.0 * (tp - tx)
        step = cubic if abs(cubic - tx) < abs(quad - tx) else cubic + (quad - cubic) / 2.0
        bracketed = True
    elif opposite:
        # Case 2: lower f, slopes of opposite signs: bracketed. The cubic step if farther
        # from tp than the secant step, else the secant step.
        r, _ = _cubic_step(tp, fp, gp, tx, fx, gx)
        cubic = tp + r * (tx - tp)
        secant = tp + gp / (gp - gx) * (tx - tp)
        step = cubic if abs(cubic - tp) > abs(secant - tp) else secant
        bracketed = True
    elif abs(gp) < abs(gx):
        # Case 3: lower f, same sign, smaller slope. The cubic step only when the cubic
        # rises beyond tp (or its minimiser lies past tp); otherwise an end of [lo, hi].
        r, gamma = _cubic_step(tp, fp, gp, tx, fx, gx, clip=True)
        if r < 0 and gamma != 0:
            cubic = tp + r * (tx - tp)
        else:
            cubic = hi if tp > tx else lo
        secant = tp + gp / (gp - gx) * (tx - tp)
        if bracketed:
            step = cubic if abs(cubic - tp) < abs(secant - tp) else secant
            bound = tp + 0.66 * (ty - tp)
            step = min(bound, step) if tp > tx else max(bound, step)
        else:
            step = cubic if abs(cubic - tp) > abs(secant - tp) else secant
            step = max(lo, min(hi, step))
    else:
        # Case 4: lower f, same sign, slope not smaller: the cubic through tp and ty when
        # bracketed, else an end of [lo, hi].
        if bracketed:
            r, _ = _cubic_step(tp, fp, gp, ty, fy, gy)
            step = tp + r * (ty - tp)
        else:
            step = hi if tp > tx else lo
    # The new interval of uncertainty.
    if fp > fx:
        other = trial
    else:
        if opposite:
            other = best
        best = trial
    return best, other, step, bracketed


def more_thuente(
    evaluate: Callable[[float], tuple[float, float]],
    f0: float,
    g0: float,
    step: float,
    step_max: float,
    ftol: float = 1e-3,
    gtol: float = 0.9,
    xtol: float = 0.1,
    max_evals: int = 20,
) -> tuple[Point, int, str]:
    """A step in ``(0, step_max]`` with sufficient decrease and, where the box allows, curvature (B19).

    Moré and Thuente, "Line search algorithms with guaranteed sufficient decrease"
    (ACM TOMS 20(3), 1994), as MINPACK-2 runs it (minimum step 0). Same callback as
    :func:`mlbfgs_fused._line_search._strong_wolfe`: ``evaluate(t) -> (f, gtd)``, host
    scalars only. Accepts a point with ``f <= f0 + ftol t g0`` and ``|gtd| <= gtol |g0|``
    ("converged"); returns the last point with a ``"warning"`` when the step is
    ``step_max`` with sufficient decrease and a still negative slope (the box stops
    the search), or when the interval of uncertainty is below ``xtol`` or rounding
    prevents progress; ``"failed"`` after ``max_evals`` evaluations without either.
    A non-finite ``f`` or ``gtd`` halves the step towards the best point so far.
    """
    XTRAPL, XTRAPU = 1.1, 4.0  # extrapolation: the next step lies in [t + 1.1 (t - tx), t + 4 (t - tx)]
    g_test = ftol * g0
    best = other = (0.0, f0, g0)
    bracketed, stage = False, 1
    width, width_before = step_max, 2.0 * step_max
    lo, hi = 0.0, step + XTRAPU * step
    evals = 0
    last = Point(0.0, f0, g0, 0)
    while evals < max_evals:
        evals += 1
        f, gtd = evaluate(step)
        last = Point(step, f, gtd, evals)
        if not (math.isfinite(f) and math.isfinite(gtd)):
            step_max = step
            hi = step
            step = best[0] + 0.5 * (step - best[0])
            continue
        f_test = f0 + step * g_test
        if stage == 1 and f <= f_test and gtd >= 0:
            stage = 2
        if f <= f_test and abs(gtd) <= gtol * -g0:
            return last, evals, "converged"
        if ((bracketed and (step <= lo or step >= hi))
                or (bracketed and hi - lo <= xtol * hi)
                or (step == step_max and f <= f_test and gtd <= g_test)
                or (step == 0.0 and (f > f_test or gtd >= g_test))):
            return last, evals, "warning"
        trial = (step, f, gtd)
        if stage == 1 and f <= best[1] and f > f_test:
            # Stage 1: interpolate psi(t) = f(t) - f0 - ftol g0 t, whose minimiser gives sufficient decrease.
            def shifted(pt):
                return (pt[0], pt[1] - pt[0] * g_test, pt[2] - g_test)

            def unshifted(pt):
                return (pt[0], pt[1] + pt[0] * g_test, pt[2] + g_test)

            b, o, step, bracketed = _trial_step(shifted(best), shifted(other), shifted(trial), bracketed, lo, hi)
            best, other = unshifted(b), unshifted(o)
        else:
            best, other, step, bracketed = _trial_step(best, other, trial, bracketed, lo, hi)
        if bracketed:
            # Bisect when the interval did not shrink enough in two steps.
            if abs(other[0] - best[0]) >= 0.66 * width_before:
                step = best[0] + 0.5 * (other[0] - best[0])
            width_before, width = width, abs(other[0] - best[0])
            lo, hi = min(best[0], other[0]), max(best[0], other[0])
        else:
            lo, hi = step + XTRAPL * (step - best[0]), step + XTRAPU * (step - best[0])
        step = min(max(step, 0.0), step_max)
        if bracketed and (step <= lo or step >= hi or hi - lo <= xtol * hi):
            step = best[0]  # no progress possible: try the best point
    return last, evals, "failed"


# ----------------------------------------------------------------------------------
# The iteration


@dataclass
class LBFGSBResult:
    """The final point and how the run ended.

    ``reason``: ``"projected_gradient"`` (B21), ``"function_change"`` (B22),
    ``"max_iter"``, ``"max_eval"``, or ``"line_search_failed"`` (no acceptable
    step even from steepest descent with an empty memory). ``skipped``: the pairs
    the curvature rule kept out of the memory (B20).
    """

    x: Tensor
    f: float
    g: Tensor
    n_iter: int
    n_eval: int
    reason: str
    projected_gradient: float
    skipped: int


def minimize_lbfgsb(
    fg: Callable[[Tensor], tuple[float, Tensor]],
    x0: Tensor,
    lower: Tensor | float | None = None,
    upper: Tensor | float | None = None,
    m: int = 10,
    pgtol: float = 1e-5,
    factr: float = 1e7,
    max_iter: int = 15000,
    max_eval: int = 15000,
    max_ls: int = 20,
) -> LBFGSBResult:
    """Minimise ``f`` over ``lower <= x <= upper`` from ``x0`` (projected into the box first).

    ``fg(x) -> (f, g)`` on a flat float64 tensor. ``lower``/``upper``: tensors of
    ``x0``'s shape, numbers or None (no bound); entries may be infinite. ``m``: the
    pairs held (scipy's ``maxcor``). Stops when ``||P(x - g) - x||_inf <= pgtol`` or
    ``f_k - f_{k+1} <= factr * eps * max(|f_k|, |f_{k+1}|, 1)`` (scipy's ``gtol`` and
    ``ftol = factr * eps``), or after ``max_iter`` iterations or ``max_eval``
    evaluations (checked after each iteration). ``max_ls``: evaluations per line search.
    """
    x0 = x0.detach().to(torch.float64).flatten()
    n = x0.numel()
    lower = _bound(lower, -math.inf, n)
    upper = _bound(upper, math.inf, n)
    if bool((lower > upper).any()):
        raise ValueError("lower > upper")
    constrained = bool(torch.isfinite(lower).any() or torch.isfinite(upper).any())
    boxed = bool((torch.isfinite(lower) & torch.isfinite(upper)).all())

    def evaluate(x: Tensor) -> tuple[float, Tensor]:
        f, g = fg(x)
        return float(f), g.detach().to(torch.float64).flatten()

    x = project(x0, lower, upper)
    f, g = evaluate(x)
    n_eval, n_iter, skipped = 1, 0, 0
    model = CompactModel.empty(n)

    def done(reason: str) -> LBFGSBResult:
        pg = float(projected_gradient(x, g, lower, upper).abs().max())
        return LBFGSBResult(x, f, g, n_iter, n_eval, reason, pg, skipped)

    if float(projected_gradient(x, g, lower, upper).abs().max()) <= pgtol:
        return done("projected_gradient")
    while True:
        # 1. The generalized Cauchy point. Without bounds it is x itself once B has pairs
        #    (the subspace step is then the plain L-BFGS step).
        try:
            if not constrained and model.k > 0:
                cp = CauchyPoint(x, torch.zeros(2 * model.k, dtype=torch.float64),
                                 torch.ones(n, dtype=torch.bool), 0.0, 0)
            else:
                cp = generalized_cauchy_point(x, g, lower, upper, model)
            # 2. Subspace minimisation over the variables free at the GCP.
            z, _ = subspace_minimization(x, g, lower, upper, cp, model)
        except torch.linalg.LinAlgError:
            model = CompactModel.empty(n)  # a singular system: drop the memory, as L-BFGS-B does
            continue
        d = z - x
        gtd0 = float(g.dot(d))
        if not gtd0 < 0.0:
            if model.k == 0:
                return done("line_search_failed")
            model = CompactModel.empty(n)  # not a descent direction: restart from steepest descent
            continue

        # 3. The line search on [0, step_max], every trial point in the box (B18).
        if not constrained:
            step_max = STEP_MAX_UNBOUNDED
        elif n_iter == 0:
            step_max = 1.0  # z = xcp lies in the box
        else:
            step_max = max_step(x, d, lower, upper, cap=STEP_MAX_UNBOUNDED)
        step = min(1.0 / float(d.norm()), step_max) if n_iter == 0 and not boxed else 1.0
        trials: dict[int, tuple[Tensor, float, Tensor]] = {}
        budget = min(max_ls, max_eval - n_eval) if max_eval > n_eval else 0

        def along(t: float) -> tuple[float, float]:
            x_t = trial_point(x, d, z, t, lower, upper)
            f_t, g_t = evaluate(x_t)
            trials[len(trials) + 1] = (x_t, f_t, g_t)
            return f_t, float(g_t.dot(d))

        if budget == 0:
            return done("max_eval")
        point, used, status = more_thuente(along, f, gtd0, step, step_max, max_evals=budget)
        n_eval += used
        if status == "failed":
            if n_eval >= max_eval:
                return done("max_eval")
            if model.k == 0:
                return done("line_search_failed")
            model = CompactModel.empty(n)  # restore x (never moved) and restart with an empty memory
            continue
        x_new, f_new, g_new = trials[point.index]
        n_iter += 1

        # 4. The pair: s.y <= eps * (-g.s) is skipped (B20).
        s, y = x_new - x, g_new - g
        f_old = f
        keep = float(s.dot(y)) > EPS * float(-g.dot(s))
        x, f, g = x_new, f_new, g_new

        # 5. Termination (B21, B22).
        if float(projected_gradient(x, g, lower, upper).abs().max()) <= pgtol:
            return done("projected_gradient")
        if f_old - f <= factr * EPS * max(abs(f_old), abs(f), 1.0):
            return done("function_change")
        if keep:
            model = model.push(s, y, m)
        else:
            skipped += 1
        if n_iter >= max_iter:
            return done("max_iter")
        if n_eval >= max_eval:
            return done("max_eval")


def _bound(b: Tensor | float | None, default: float, n: int) -> Tensor:
    if b is None:
        return torch.full((n,), default, dtype=torch.float64)
    if isinstance(b, (int, float)):
        return torch.full((n,), float(b), dtype=torch.float64)
    b = b.detach().to(torch.float64).flatten()
    if b.numel() != n:
        raise ValueError(f"a bound of {b.numel()} entries for {n} variables")
    return b
