"""Bound constraints for :class:`~mlbfgs_fused.LBFGS`: L-BFGS-B on the optimizer's state.

``LBFGS(params, bounds=(lower, upper))`` minimises over the box ``lower <= x <= upper``
with the algorithm of Byrd, Lu, Nocedal and Zhu (1995) as L-BFGS-B 3.0 runs it (Morales
and Nocedal, 2011), the algorithm of :mod:`mlbfgs_fused.reference.lbfgsb` (its float64
ground truth): the generalized Cauchy point on the compact representation, the subspace
minimisation over the free variables with the projection back into the box, Moré and
Thuente's line search on ``[0, lambda_max]``, the pair rule ``s.y > eps (-g.s)`` and
projected-gradient termination. docs/design.md, "L-BFGS-B (bound constraints)", derives
the formulas (B1)-(B22) cited here and "Bounds in LBFGS" describes this module.

Where the state lives: the memory is LBFGS's own (the arenas' rings ``history_s``,
``history_y`` in slot order, the optimizer's ``gram`` ``[3, m, m]`` and ``pair_count``;
the oldest held pair is slot ``(pair_count - k) % m`` for ``k = min(pair_count, m)``
pairs held), so checkpoints have LBFGS's layout. The iterate, its gradient, the trial
point and the bounds are flat float64 vectors on the first arena's device, the arenas
laid end to end (a float64 arena on that device is written and read in place through
them; others through a staging buffer of their own dtype). Every step of the iteration
is torch ops on these vectors and on the rings (one program on every device and
backend); the host reads one small vector per closure evaluation (the loss, ``g.d``,
the projected gradient's max-norm, ``s.y`` and ``g.s``) and one per iteration (``g.d``,
``lambda_max``, ``||d||`` and the factorisations' status), and decides only what the
line search and the termination rules decide.
"""

from __future__ import annotations

import math
from numbers import Real
from types import SimpleNamespace

import torch
from torch import Tensor

from .reference.lbfgsb import EPS, STEP_MAX_UNBOUNDED, more_thuente

__all__ = ["bounded", "check_group", "group_bounds", "step"]

_CHUNK = 1 << 16  # columns of the ring per chunk of a widened product
_GCP_CHUNK = 1 << 17  # breakpoints per chunk of the Cauchy point's prefix sums
_FIRST_CHUNK = 256  # on the CPU, the first chunk (the next ones 4 times larger, up to _GCP_CHUNK)
_HEAD = 4096  # on the CPU, the breakpoints searched before a full sort
# On the CPU, where the host is the device and a read costs nothing, reads that pick the cheaper
# path: the Cauchy point's search stops at the first chunk that holds it, and the free
# variables' Gram blocks are taken over the smaller of the free and the bound variables.
CPU_SHORTCUTS = True
MAX_LS = 20  # evaluations per line search (L-BFGS-B's)

# The vector the host reads after each evaluation, and after each direction.
R_LOSS, R_GTD, R_PG, R_SY, R_GS = range(5)
D_GTD, D_STEP_MAX, D_NORM, D_INFO = range(4)


# ----------------------------------------------------------------------------------
# The API: what a group's ``bounds`` may be


def group_bounds(bounds) -> tuple | None:
    """``(lower, upper)`` of a ``bounds`` entry, or None when it bounds nothing.

    Each of ``lower``, ``upper`` is None, a real number or a real tensor; an infinite
    number (``-inf`` below, ``inf`` above) is no bound."""
    if bounds is None:
        return None
    if isinstance(bounds, Tensor) or not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(
            f"bounds must be None or a pair (lower, upper), but got {type(bounds).__name__}"
        )
    out = []
    for name, b, open_end in (("lower", bounds[0], -math.inf), ("upper", bounds[1], math.inf)):
        if isinstance(b, Tensor):
            if b.is_complex() or b.dtype == torch.bool:
                raise TypeError(f"Invalid {name} bound: a tensor of real numbers expected, got {b.dtype}")
        elif b is not None:
            if isinstance(b, bool) or not isinstance(b, Real):
                raise TypeError(
                    f"Invalid {name} bound: None, a number or a tensor expected, got {type(b).__name__}"
                )
            b = float(b)
            if math.isnan(b):
                raise ValueError(f"Invalid {name} bound: {b}")
            if b == -open_end:
                raise ValueError(f"Invalid {name} bound: {b} (no point lies in such a box)")
            if b == open_end:
                b = None
        out.append(b)
    return None if out[0] is None and out[1] is None else tuple(out)


def bounded(optimizer) -> bool:
    """Whether any group of ``optimizer`` sets a bound."""
    return any(group_bounds(g.get("bounds")) is not None for g in optimizer.param_groups)


def check_group(group: dict, params: list, other_groups: list[dict]) -> None:
    """The errors of a group's bounds (before it joins the optimizer): a bound on a
    parameter that is not real floating point, a tensor bound of another shape than its
    parameter (or in a group of several parameters), NaN, ``lower > upper`` anywhere,
    and groups of different ``lr`` in an optimizer with bounds."""
    pair = group_bounds(group["bounds"])
    if isinstance(params, Tensor):
        params = [params]
    params = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]  # (name, tensor) pairs
    if pair is None:
        if any(group_bounds(g.get("bounds")) is not None for g in other_groups):
            _check_lr(group, other_groups)
        return
    for p in params:
        if not isinstance(p, Tensor):
            continue
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"LBFGS bounds apply to real floating-point parameters, but got a {p.dtype} parameter")
    for name, b in zip(("lower", "upper"), pair):
        if not isinstance(b, Tensor):
            continue
        if len(params) != 1:
            raise ValueError(
                f"a tensor {name} bound applies to a group of one parameter, but the group has "
                f"{len(params)}: give a number, or each bounded parameter a group of its own"
            )
        if tuple(b.shape) != tuple(params[0].shape):
            raise ValueError(
                f"{name} bound has shape {tuple(b.shape)}, but its parameter has shape {tuple(params[0].shape)}"
            )
        if bool(torch.isnan(b).any()):
            raise ValueError(f"Invalid {name} bound: it holds NaN")
        if bool((b == (math.inf if name == "lower" else -math.inf)).any()):
            raise ValueError(f"Invalid {name} bound: it holds {'inf' if name == 'lower' else '-inf'} "
                             "(no point lies in such a box)")
    lower, upper = pair
    if lower is not None and upper is not None:
        lo = torch.as_tensor(lower).detach().to("cpu", torch.float64)
        hi = torch.as_tensor(upper).detach().to("cpu", torch.float64)
        bad = int((lo > hi).sum())
        if bad:
            raise ValueError(f"Invalid bounds: lower > upper at {bad} of {max(lo.numel(), hi.numel())} entries")
    _check_lr(group, other_groups)


def _check_lr(group: dict, other_groups: list[dict]) -> None:
    lrs = {float(g["lr"]) for g in [*other_groups, group]}
    if len(lrs) > 1:
        raise ValueError(
            f"LBFGS with bounds takes one lr for all parameter groups (one step spans the box), "
            f"but the groups set {sorted(lrs)}"
        )


# ----------------------------------------------------------------------------------
# The state beside the plan


class _Box:
    """The bounded iteration's vectors (float64, on the first arena's device, the arenas
    end to end) and the host's count of the memory, for one plan."""

    def __init__(self, optimizer, plan, arenas):
        self.plan, self.arenas = plan, arenas
        self.m = arenas[0].m
        self.home = arenas[0].device
        self.maximize = optimizer.defaults["maximize"]
        self.offsets = [0]
        for arena in arenas:
            self.offsets.append(self.offsets[-1] + arena.numel)
        n = self.n = self.offsets[-1]
        f64 = dict(dtype=torch.float64, device=self.home)
        self.lower = torch.full((n,), -math.inf, **f64)
        self.upper = torch.full((n,), math.inf, **f64)
        for a, arena in enumerate(arenas):
            pair = group_bounds(optimizer.param_groups[arena.group].get("bounds"))
            if pair is None:
                continue
            for buffer, b in zip((self.lower, self.upper), pair):
                if b is None:
                    continue
                flat = torch.empty(arena.numel, dtype=arena.dtype, device=arena.device)
                for i, p in enumerate(arena.params):
                    # Rounded to the parameter's dtype: the box its values can lie in.
                    arena.param_view(flat, i).copy_(torch.as_tensor(b).detach().to(p.device, p.dtype))
                self.part(buffer, a).copy_(flat)
        self.x, self.g, self.xt, self.gt, self.z = (torch.zeros(n, **f64) for _ in range(5))
        self.d = torch.zeros(n, **f64)
        # A float64 arena on the home device is staged through the vectors themselves.
        self.direct = [arena.dtype == torch.float64 and arena.device == self.home for arena in arenas]
        self.stage = [None if direct else torch.zeros(arena.numel, dtype=arena.dtype, device=arena.device)
                      for direct, arena in zip(self.direct, arenas)]
        finite_lo, finite_hi = torch.isfinite(self.lower), torch.isfinite(self.upper)
        self.constrained = bool((finite_lo | finite_hi).any())
        self.boxed = bool((finite_lo & finite_hi).all())
        self.count = int(plan.pair_count)  # pairs pushed since the memory was last emptied
        self.read = torch.zeros(5, **f64)
        self.read_direction = torch.zeros(4, **f64)

    def part(self, v: Tensor, a: int) -> Tensor:
        return v[self.offsets[a] : self.offsets[a + 1]]

    # -- parameters and gradients -------------------------------------------------
    def _staged(self, v: Tensor, a: int) -> list[Tensor]:
        arena = self.arenas[a]
        flat = self.part(v, a) if self.direct[a] else self.stage[a]
        return [arena.param_view(flat, i) for i in range(len(arena.params))]

    def write_params(self, v: Tensor) -> None:
        """The parameters set to ``v``; ``v`` then holds them as their dtype rounded it."""
        for a, arena in enumerate(self.arenas):
            if not self.direct[a]:
                self.stage[a].copy_(self.part(v, a))
            torch._foreach_copy_(arena.params, self._staged(v, a))
            if not self.direct[a]:
                self.part(v, a).copy_(self.stage[a])

    def read_params(self, v: Tensor) -> None:
        for a, arena in enumerate(self.arenas):
            torch._foreach_copy_(self._staged(v, a), arena.params)
            if not self.direct[a]:
                self.part(v, a).copy_(self.stage[a])

    def read_grads(self, v: Tensor) -> None:
        """``v = g`` (negated under maximize; zero where a parameter has no gradient)."""
        for a, arena in enumerate(self.arenas):
            views = self._staged(v, a)
            present = [(view, p.grad) for view, p in zip(views, arena.params) if p.grad is not None]
            if len(present) < len(views):
                (self.part(v, a) if self.direct[a] else self.stage[a]).zero_()
            if present:
                torch._foreach_copy_([view for view, _ in present], [g for _, g in present])
            if not self.direct[a]:
                self.part(v, a).copy_(self.stage[a])
        if self.maximize:
            v.neg_()

    def project(self, v: Tensor) -> Tensor:
        """``v = P(v)`` in place (B1)."""
        torch.maximum(v, self.lower, out=v)
        return torch.minimum(v, self.upper, out=v)

    def projected_gradient_max(self, x: Tensor, g: Tensor) -> Tensor:
        """``||P(x - g) - x||_inf`` (B21)."""
        return torch.minimum(torch.maximum(x - g, self.lower), self.upper).sub_(x).abs_().max()

    def max_step(self, x: Tensor, d: Tensor, cap: float) -> Tensor:
        """The largest ``a`` in ``[0, cap]`` with ``x + a d`` in the box (B17, B18), on the device:
        the least ``(bound - x) / d`` over the variables that move (an infinite bound gives
        ``inf``; a variable past its bound by rounding, a negative ratio: 0)."""
        if not x.numel():
            return torch.tensor(cap, dtype=torch.float64, device=self.home)
        ratio = torch.where(d < 0, self.lower, self.upper).sub_(x).div_(d)
        return torch.where(d != 0, ratio, math.inf).min().clamp(0.0, cap)

    # -- products with the ring (W = [Y^T, theta S^T] over the held slots) --------------
    def _ring_dots(self, R: Tensor, v: Tensor) -> Tensor:
        """``R v`` (``[m]``, or ``[m, j]`` for ``v`` ``[n, j]``; float64 on the home device) for a
        ring ``R`` and float64 ``v``."""
        if R.dtype == torch.float64 and R.device == v.device:
            return R @ v
        total = torch.zeros(R.shape[0], *v.shape[1:], dtype=torch.float64, device=R.device)
        for lo in range(0, v.numel(), _CHUNK):
            hi = min(v.numel(), lo + _CHUNK)
            total += R[:, lo:hi].double() @ v[lo:hi].to(R.device)
        return total.to(self.home)

    def _add_combination(self, out: Tensor, R: Tensor, c: Tensor) -> None:
        """``out += R^T c`` (``out`` a float64 slice on the home device)."""
        if R.dtype == torch.float64 and R.device == out.device:
            out.addmv_(R.t(), c)
            return
        c = c.to(R.device)
        for lo in range(0, out.numel(), _CHUNK):
            hi = min(out.numel(), lo + _CHUNK)
            out[lo:hi] += (R[:, lo:hi].double().t() @ c).to(out.device)

    def Wt(self, v: Tensor, model, full: bool = False) -> Tensor:
        """``W^T v = [Y v; theta S v]`` (``2k``) (B3); over every slot (``2m``, slot order) when ``full``."""
        slots, theta = model.slots, model.theta
        yv = sv = 0.0
        for a, arena in enumerate(self.arenas):
            S, Y = arena.rings()
            yv = yv + self._ring_dots(Y, self.part(v, a))
            sv = sv + self._ring_dots(S, self.part(v, a))
        if full:
            return torch.cat([yv, theta * sv])
        return torch.cat([yv[slots], theta * sv[slots]])

    def W(self, c: Tensor, model, out: Tensor) -> Tensor:
        """``out = W c = Y^T c_Y + theta S^T c_S`` (``n``)."""
        k, m, slots = model.k, self.m, model.slots
        zeros = torch.zeros(m, dtype=torch.float64, device=self.home)
        cy = zeros.index_copy(0, slots, c[:k])
        cs = zeros.index_copy(0, slots, model.theta * c[k:])
        out.zero_()
        for a, arena in enumerate(self.arenas):
            S, Y = arena.rings()
            self._add_combination(self.part(out, a), Y, cy)
            self._add_combination(self.part(out, a), S, cs)
        return out

    def W_cols(self, index: Tensor, model) -> Tensor:
        """Rows ``index`` of ``W`` over every slot, transposed (``[2m, len(index)]``, slot
        order; rows of unheld slots meet zeros in ``model.M_slots``): the ring's columns there."""
        out = None
        for a, arena in enumerate(self.arenas):
            S, Y = arena.rings()
            lo, hi = self.offsets[a], self.offsets[a + 1]
            local = (index - lo).clamp(0, hi - lo - 1).to(arena.device)
            part = torch.cat([Y.index_select(1, local), S.index_select(1, local)]).to(self.home, torch.float64)
            part[self.m :] *= model.theta
            if len(self.arenas) > 1:
                part = torch.where(((index >= lo) & (index < hi))[None, :], part, 0.0)
            out = part if out is None else out + part
        return out

    def free_gram(self, free: Tensor, model) -> Tensor:
        """``W_F^T W_F`` (``2k x 2k``) from the Gram blocks over the free variables (B15):
        one masked product of the ring with itself; on the CPU, over the bound variables
        when they are fewer, subtracted from ``gram`` (``W^T W`` over every variable)."""
        m = self.m
        complement = CPU_SHORTCUTS and self.home.type == "cpu" and bool(2 * free.sum() > self.n)
        mask = ~free if complement else free
        blocks = torch.zeros(3, m, m, dtype=torch.float64, device=self.home)
        for a, arena in enumerate(self.arenas):
            S, Y = arena.rings()
            part = self.part(mask, a).to(arena.device)
            for lo in range(0, arena.numel, _CHUNK):
                hi = min(arena.numel, lo + _CHUNK)
                Sc, Yc = S[:, lo:hi].double(), Y[:, lo:hi].double()
                SF = Sc * part[lo:hi]
                blocks += torch.stack([SF @ Sc.t(), SF @ Yc.t(), (Yc * part[lo:hi]) @ Yc.t()]).to(self.home)
        return _WtW(self.plan.gram - blocks if complement else blocks, model)

    # -- the memory -------------------------------------------------------------------
    def held(self) -> int:
        return min(self.count, self.m)

    def model(self):
        """theta, ``M`` and ``M^{-1}`` (B2)-(B5) of the held pairs, from ``gram`` on the device;
        ``info`` is non-zero when ``T`` has no Cholesky factor."""
        k, m = self.held(), self.m
        slots = torch.tensor([(self.count - k + i) % m for i in range(k)], dtype=torch.int64, device=self.home)
        f64 = dict(dtype=torch.float64, device=self.home)
        if k == 0:
            empty = torch.zeros(0, 0, **f64)
            return SimpleNamespace(k=0, slots=slots, theta=torch.ones((), **f64), M=empty, Minv=empty,
                                   info=torch.zeros((), dtype=torch.int32, device=self.home))
        gram = self.plan.gram[:, slots][:, :, slots]
        SS, SY, YY = gram.unbind(0)
        theta = YY[-1, -1] / SY[-1, -1]
        D = SY.diagonal()
        L = SY.tril(-1)
        T = theta * SS + (L / D) @ L.t()  # L D^{-1} L^T
        J, info = torch.linalg.cholesky_ex(T)
        Tinv = torch.cholesky_inverse(J)
        Dinv = torch.diag(1.0 / D)
        A = Dinv @ L.t() @ Tinv
        M = torch.cat([torch.cat([-Dinv + A @ L @ Dinv, A], 1), torch.cat([A.t(), Tinv], 1)], 0)
        Minv = torch.cat([torch.cat([-torch.diag(D), L.t()], 1), torch.cat([L, theta * SS], 1)], 0)
        # M over every slot ([2m, 2m], slot order: Y's slots then S's), zero where no pair is held.
        where = torch.cat([slots, slots + m])
        M_slots = torch.zeros(2 * m, 2 * m, **f64)
        M_slots[where[:, None], where[None, :]] = M
        return SimpleNamespace(k=k, slots=slots, theta=theta, M=M, Minv=Minv, M_slots=M_slots, info=info)

    def push(self, s: Tensor, y: Tensor) -> None:
        """The pair into slot ``count % m`` of the rings and its row and column into ``gram``
        (the dots of the stored, rounded, pair with the ring)."""
        m = self.m
        slot = self.count % m
        rows = 0.0
        for a, arena in enumerate(self.arenas):
            S, Y = arena.rings()
            S[slot].copy_(self.part(s, a))
            Y[slot].copy_(self.part(y, a))
            pair = torch.stack([S[slot], Y[slot]], 1).to(self.home, torch.float64)  # [n, 2]: one pass per ring
            rows = rows + torch.cat([self._ring_dots(S, pair), self._ring_dots(Y, pair)], 1)
        ss, sy, ys, yy = rows.t().unbind(0)  # s_i.s, s_i.y, y_i.s, y_i.y
        gram = self.plan.gram
        gram[0, slot, :] = ss
        gram[0, :, slot] = ss
        gram[1, :, slot] = sy  # [i, j] = s_i . y_j
        gram[1, slot, :] = ys
        gram[2, slot, :] = yy
        gram[2, :, slot] = yy
        self.count += 1
        self.plan.pair_count.fill_(self.count)

    def forget(self) -> None:
        """The memory emptied (L-BFGS-B's restart)."""
        self.count = 0
        self.plan.pair_count.zero_()

    # -- the direction ------------------------------------------------------------------
    def cauchy_point(self, model):
        """The generalized Cauchy point (B7)-(B13): ``(xcp, c = W^T (xcp - x), free)``.

        The breakpoints are sorted; the derivatives ``f'_j``, ``f''_j`` of every segment
        come from prefix sums over the breakpoints passed (B13), and the GCP's segment is
        the first whose minimiser falls inside it (:meth:`_first_segment`): an argmax, no
        host read. Where the device is the host (the CPU) the segments are searched from
        the start and the search stops at the first chunk that holds the GCP, the nearest
        ``_HEAD`` breakpoints taken first (``topk``) so that a full sort is needed only
        when the GCP lies beyond them."""
        x, g, lower, upper = self.x, self.g, self.lower, self.upper
        n = self.n
        t = torch.where(g < 0, (x - upper) / g, torch.where(g > 0, (x - lower) / g, math.inf))  # (B7)
        held = ((x <= lower) & (g >= 0)) | ((x >= upper) & (g <= 0))
        t = torch.where(held, 0.0, t)
        d = torch.where(t > 0, -g, 0.0)  # (B8)
        is_break = (t > 0) & torch.isfinite(t)
        towards = torch.where(d > 0, upper, lower)
        path = SimpleNamespace(
            keys=torch.where(is_break, t, math.inf),
            count=is_break.sum(),
            d=torch.where(is_break, d, 0.0),
            z=torch.where(is_break, towards - x, 0.0),
            dd=d.dot(d),
            unbounded=((d != 0) & torch.isinf(t)).any(),
            p0=self.Wt(d, model, full=True) if model.k else None,
        )
        found = None
        host = CPU_SHORTCUTS and self.home.type == "cpu"
        if host and n > _HEAD:
            found = self._first_segment(*torch.topk(path.keys, _HEAD, largest=False, sorted=True), path, model,
                                        False, host)
        if found is None:
            found = self._first_segment(*torch.sort(path.keys, stable=True), path, model, True, host)
        order, j, t_c = found
        passed = torch.zeros(n, dtype=torch.bool, device=self.home)
        passed.scatter_(0, order, torch.arange(order.numel(), device=self.home) < j)
        moved = torch.minimum(torch.maximum(x + t_c * d, lower), upper)
        xcp = torch.where(passed, towards, torch.where(d != 0, moved, x))
        free = (t > 0) & ~passed
        c = self.Wt(xcp - x, model) if model.k else torch.zeros(0, dtype=torch.float64, device=self.home)
        return xcp, c, free

    def _first_segment(self, keys: Tensor, order: Tensor, path, model, complete: bool, host: bool):
        """``(order, j, t_c)``: the GCP's segment ``j`` among the breakpoints ``order``
        (sorted, ``keys`` their times) and its path time ``t_c`` (B9)-(B11), (B13); None
        when ``order`` is the head of the breakpoints only (not ``complete``) and the GCP
        lies beyond it. Segment ``j`` starts at breakpoint ``j - 1`` (0 for ``j = 0``)."""
        L = keys.numel()
        segments = L + 1 if complete else L
        f64 = dict(dtype=torch.float64, device=self.home)
        zero = torch.zeros(1, **f64)
        d_b, z_b = path.d[order], path.z[order]
        start = torch.cat([zero, keys])[:segments]                                      # t_{j-1}
        length = torch.cat([keys, torch.full((1,), math.inf, **f64)])[:segments] - start
        dd = path.dd - torch.cat([zero, torch.cumsum(d_b * d_b, 0)])[:segments]          # ||d^j||^2
        theta = model.theta
        f1 = -dd + theta * start * dd                                                    # (B9) without W
        f2 = theta * dd                                                                  # (B10) without W
        first_is_gcp = torch.arange(segments, device=self.home) == path.count  # past the last breakpoint
        if model.k:
            p0, M = path.p0, model.M_slots
            f2_first = f2[0] - p0 @ M @ p0
            P = torch.zeros(p0.numel(), 1, **f64)  # sums of d_b w_b, z_b w_b over the breakpoints passed
            C = torch.zeros(p0.numel(), 1, **f64)
            dt_min = torch.full((segments,), math.nan, **f64)
            inside = torch.zeros(segments, dtype=torch.bool, device=self.home)
            lo, size = 0, (_FIRST_CHUNK if host else _GCP_CHUNK)
            while lo < segments:
                hi = min(segments, lo + size)
                w = self.W_cols(order[lo : min(L, hi)], model)                   # [2m, C]
                dw = w * d_b[lo : min(L, hi)]
                zw = w.mul_(z_b[lo : min(L, hi)])
                P_j = torch.cat([P, P + torch.cumsum(dw, 1)], 1)[:, : hi - lo]  # before each segment
                C_j = torch.cat([C, C + torch.cumsum(zw, 1)], 1)[:, : hi - lo]
                P, C = P + dw.sum(1, keepdim=True), C + zw.sum(1, keepdim=True)
                p = P_j.neg_().add_(p0[:, None])                                # p_j = W^T d^j
                c = C_j.addcmul_(start[lo:hi], p)                               # c_j = W^T z^j
                pM = M @ p                                                      # M is symmetric
                f1_j = f1[lo:hi] - (pM * c).sum(0)
                f2_j = torch.maximum(f2[lo:hi] - (pM * p).sum(0), EPS * f2_first)
                dt_min[lo:hi] = -f1_j / f2_j
                inside[lo:hi] = (dt_min[lo:hi] < length[lo:hi]) | first_is_gcp[lo:hi]
                if host and bool(inside[lo:hi].any()):
                    break  # the host is the device: no need to look further
                lo, size = hi, min(4 * size, _GCP_CHUNK)
        else:
            dt_min = -f1 / torch.maximum(f2, EPS * f2[0])
            inside = (dt_min < length) | first_is_gcp
        if not complete and not bool(inside.any()):
            return None
        j = torch.argmax(inside.to(torch.int8))  # the first segment holding its minimiser (B11)
        at = j.view(1)  # indexed by a tensor: no read of j
        dt = torch.where((j < path.count) | path.unbounded, dt_min.index_select(0, at)[0].clamp(min=0.0), 0.0)
        return order, j, start.index_select(0, at)[0] + dt.nan_to_num(0.0)

    def target(self, model) -> Tensor:
        """``z`` of the iteration into ``self.z``: the GCP then the subspace step (B14)-(B17)."""
        x, g, lower, upper = self.x, self.g, self.lower, self.upper
        k, theta = model.k, model.theta
        if not self.constrained and k:
            xcp, c, free = x, torch.zeros(2 * k, dtype=torch.float64, device=self.home), None
        else:
            xcp, c, free = self.cauchy_point(model)
        if not k:
            return self.z.copy_(xcp), model.info
        F = free.double() if free is not None else None
        # (B14) r = -Z^T (g + theta (xcp - x) - W M c)
        r = g + theta * (xcp - x) - self.W(model.M @ c, model, self.z)
        r.neg_()
        if F is not None:
            r.mul_(F)
        # (B15) du = r / theta + W_F K^{-1} W_F^T r / theta^2, K = M^{-1} - W_F^T W_F / theta
        WtW = self.free_gram(free, model) if free is not None else _WtW(self.plan.gram, model)
        K = model.Minv - WtW / theta
        v, info = torch.linalg.solve_ex(K, self.Wt(r, model))
        du = self.W(v, model, torch.empty_like(x)).div_(theta * theta).add_(r / theta)
        if F is not None:
            du.mul_(F)
        if not self.constrained:
            return self.z.copy_(xcp + du), model.info + info
        # (B16) projected into the box; (B17) backtracked when that is no descent direction
        z = self.project(xcp + du)
        on_bound = (free & ((z == lower) | (z == upper))).any()
        descent = (z - x).dot(g) <= 0.0
        alpha = self.max_step(xcp, du, cap=1.0)
        back = self.project(xcp + alpha * du)
        self.z.copy_(torch.where(on_bound & ~descent, back, z))
        return self.z, model.info + info


def _WtW(blocks: Tensor, model) -> Tensor:
    """``W^T W`` (``2k x 2k``, B15) from Gram blocks ``[3, m, m]`` (``S S^T``, ``S Y^T``,
    ``Y Y^T`` in slot order) over some variables: the held slots, in recency order."""
    slots, t = model.slots, model.theta
    SS, SY, YY = blocks[:, slots][:, :, slots].unbind(0)
    return torch.cat([torch.cat([YY, t * SY.t()], 1), torch.cat([t * SY, t * t * SS], 1)], 0)


# ----------------------------------------------------------------------------------
# The step


def _host(optimizer, vec: Tensor) -> list[float]:
    """The read vector on the host (averaged over the ranks when distributed)."""
    return optimizer._read(SimpleNamespace(read=vec))


def _box(optimizer) -> _Box:
    plan = optimizer._setup()
    box = getattr(optimizer, "_box", None)
    if box is None or box.plan is not plan:
        box = _Box(optimizer, plan, optimizer._arenas)
        optimizer._box = box
    return box


def step(optimizer, closure):
    """One ``LBFGS.step`` with bounds: up to ``max_iter`` L-BFGS-B iterations from the
    parameters projected into the box (docs/design.md, "Bounds in LBFGS")."""
    cfg = optimizer.param_groups[0]
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    if len(lrs) > 1:
        raise ValueError(
            f"LBFGS with bounds takes one lr for all parameter groups, but the groups set {sorted(lrs)}"
        )
    lr = lrs.pop()
    max_iter, max_eval = cfg["max_iter"], cfg["max_eval"]
    pgtol, ftol = cfg["tolerance_grad"], cfg["tolerance_change"]
    box = _box(optimizer)
    state = optimizer.state[optimizer._first_param()]
    state.setdefault("func_evals", 0)
    state.setdefault("n_iter", 0)
    x, g, xt, gt, d = box.x, box.g, box.xt, box.gt, box.d
    read = box.read

    def evaluate(at: Tensor, pair: bool) -> tuple[object, list[float]]:
        """The closure at the parameters (``at`` holds them), its gradient into ``gt``; one read."""
        with torch.enable_grad():  # as torch wraps the closure
            loss = closure()
        box.read_grads(gt)
        on_device = isinstance(loss, Tensor) and loss.numel() == 1 and loss.device == box.home
        if on_device:
            read[R_LOSS].copy_(loss.detach().reshape(()))
        read[R_GTD] = gt.dot(d)
        read[R_PG] = box.projected_gradient_max(at, gt)
        if pair:
            s = at - x
            read[R_SY] = s.dot(gt - g)
            read[R_GS] = g.dot(s)
        values = _host(optimizer, read)
        if not on_device:
            values[R_LOSS] = float(loss)
        if box.maximize:
            values[R_LOSS] = -values[R_LOSS]
        return loss, values

    # The start, projected into the box (B1).
    box.read_params(x)
    box.project(x)
    box.write_params(x)
    orig_loss, first = evaluate(x, False)
    g.copy_(gt)
    f, pg = first[R_LOSS], first[R_PG]
    evals = 1
    state["func_evals"] += 1
    if not (math.isfinite(f) and math.isfinite(pg)) or pg <= pgtol or max_iter == 0:
        return orig_loss

    n_iter = 0
    while True:
        # 1-2. The generalized Cauchy point and the subspace step: z and d = z - x.
        model = box.model()
        z, info = box.target(model)
        torch.sub(z, x, out=d)
        out = box.read_direction
        out[D_GTD] = g.dot(d)
        out[D_STEP_MAX] = (box.max_step(x, d, STEP_MAX_UNBOUNDED) if box.constrained and state["n_iter"] > 0
                           else (1.0 if box.constrained else STEP_MAX_UNBOUNDED))
        out[D_NORM] = torch.linalg.vector_norm(d)
        out[D_INFO] = info
        gtd0, step_max, d_norm, failed = _host(optimizer, out)
        if failed != 0:
            box.forget()  # a singular system: the memory dropped, as L-BFGS-B does
            continue
        if not gtd0 < 0.0:
            if model.k == 0:
                break  # no descent direction even from steepest descent
            box.forget()
            continue

        # 3. The line search on [0, step_max], every trial point in the box (B18, B19).
        start = min(1.0 / d_norm, step_max) if state["n_iter"] == 0 and not box.boxed else 1.0
        start = min(lr * start, step_max)
        budget = min(MAX_LS, max_eval - evals)
        if budget <= 0 or start <= 0.0:
            break
        trials = []

        def along(step: float) -> tuple[float, float]:
            if step == 1.0:
                xt.copy_(z)
            else:
                box.project(torch.add(x, d, alpha=step, out=xt))
            box.write_params(xt)
            _, values = evaluate(xt, True)
            trials.append(values)
            return values[R_LOSS], values[R_GTD]

        point, used, status = more_thuente(along, f, gtd0, start, step_max, max_evals=budget)
        evals += used
        state["func_evals"] += used
        if status == "failed":
            box.write_params(x)  # back to the iterate, whose gradient is g
            if evals >= max_eval or model.k == 0:
                break
            box.forget()
            continue
        accepted = trials[point.index - 1]
        n_iter += 1
        state["n_iter"] += 1

        # 4. The pair (B20), kept unless s.y <= eps (-g.s); 5. termination (B21, B22).
        keep = accepted[R_SY] > EPS * -accepted[R_GS]
        f_old, f = f, accepted[R_LOSS]
        s = xt - x
        y = gt - g
        x.copy_(xt)
        g.copy_(gt)
        if accepted[R_PG] <= pgtol:
            break
        if f_old - f <= ftol * max(abs(f_old), abs(f), 1.0):
            break
        if keep:
            box.push(s, y)
        if n_iter >= max_iter or evals >= max_eval:
            break
    return orig_loss
