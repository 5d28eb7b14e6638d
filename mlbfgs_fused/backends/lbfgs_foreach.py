"""LBFGS's passes with ``torch._foreach_*`` and flat tensor ops, on any device.

Each arena's gradient is gathered into a scratch row (``work[0]``), the pair candidate
formed in ``work[1]`` (``s``) and ``work[2]`` (``y``), rounded to the history dtype as the
ring stores them; the dots with the ring are matrix products (through float32 column
chunks when the ring is narrower than the parameters, as in :mod:`.foreach`), the
single dots take float64 products. The model (the pair's acceptance, the candidate
Gram matrices, the two-loop) is a fixed sequence of small float64 operations on the
first arena's device, the two loops as two triangular solves. A pair is written into
its slot masked by its acceptance (the slot's row, blended with weight 0 or 1), so no
decision reaches the host. Small float64 tensors are made along the way (and, with a
ring narrower than the parameters, float32 column chunks); nothing of the arenas' size.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._state.lbfgs_arena import LBFGSArena
from . import LBFGSPlan
from ._lbfgs import (
    CURVATURE_MIN,
    MODEL_ACCEPT,
    MODEL_COUNT,
    MODEL_SLOT,
    P_DMAX,
    P_GD,
    P_GG,
    P_GL1,
    P_GMAX,
    P_SG,
    P_SS,
    P_SY,
    P_YG,
    P_YY,
    READ_FIXED,
    READ_GG,
    READ_GL1,
    READ_GMAX,
    READ_GTD,
    READ_GTD_NEXT,
    READ_LOSS,
    SOURCE_GRAD,
    SOURCE_KEPT,
    LBFGSPlanBase,
    partial_width,
    scalar_column,
)
from .foreach import _combine, _dot, _ring_dots


class ForeachLBFGSPlan(LBFGSPlanBase, LBFGSPlan):
    def __init__(self, arenas: list[LBFGSArena], gram: Tensor, pair_count: Tensor, maximize: bool,
                 line_search: bool):
        super().__init__(arenas, gram, pair_count, maximize, line_search)
        m = self.m
        self.work = [torch.zeros(3, a.numel, dtype=a.dtype, device=a.device) for a in arenas]
        self.narrow = [
            torch.zeros(2, a.numel, dtype=a.history_dtype, device=a.device) if a.history_dtype != a.dtype else None
            for a in arenas
        ]
        self.wide = [torch.zeros(3, min(a.numel, 1 << 16), dtype=torch.float64, device=a.device) for a in arenas]
        self.partials = [torch.zeros(partial_width(m), dtype=torch.float64, device=a.device) for a in arenas]
        self.slot_rows = [torch.zeros(1, a.numel, dtype=a.history_dtype, device=a.device) for a in arenas]
        self.d_views = [self._views(a, a.direction) for a in arenas]
        self.g_views = [self._views(a, w[0]) for a, w in zip(arenas, self.work)]
        self.gathered = False  # whether work[0] holds the user's gradients of the last evaluation

    # -- helpers ------------------------------------------------------------------
    def bind(self) -> None:
        self.gathered = False

    def _gradient(self, a: int, source: int) -> Tensor:
        """Arena ``a``'s gradient of the current point, as a flat tensor."""
        g = self.work[a][0]
        if source == SOURCE_GRAD:
            if not self.gathered:
                self._gather()
            return g
        return (self.kept if source == SOURCE_KEPT else [x.prev_grad for x in self.arenas])[a]

    def _gather(self) -> None:
        for arena, work, views in zip(self.arenas, self.work, self.g_views):
            present = [(v, g) for v, g in zip(views, arena.local_grads()) if g is not None]
            if len(present) < len(views):
                work[0].zero_()
            if present:
                torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
            if self.maximize:
                work[0].neg_()
        self.gathered = True

    def _pair(self, a: int, g: Tensor, alpha: float) -> None:
        """``work[1] = s = alpha d``, ``work[2] = y = g - prev_grad``, as the ring stores them."""
        arena, work = self.arenas[a], self.work[a]
        torch.mul(arena.direction, alpha, out=work[1])
        torch.sub(g, arena.prev_grad, out=work[2])
        narrow = self.narrow[a]
        if narrow is not None:  # rounded to the history dtype and back
            narrow.copy_(work[1:])
            work[1:].copy_(narrow)

    # -- the passes -------------------------------------------------------------------
    def gradient_dots(self, source: int, alphas: list[float], pair: bool, ring: bool, gd: bool = False,
                      l1: bool = False) -> None:
        m = self.m
        for a, arena in enumerate(self.arenas):
            g = self._gradient(a, source)
            work, out, wide = self.work[a], self.partials[a], self.wide[a]
            if g.data_ptr() != work[0].data_ptr():
                work[0].copy_(g)
            if pair:
                self._pair(a, work[0], alphas[a])
            S, Y = arena.rings()
            vectors = (work[0], work[1], work[2]) if pair else (work[0],)
            for k, x in enumerate(vectors):
                if ring:
                    out[2 * m * k : 2 * m * k + m] = _ring_dots(S, x)
                    out[2 * m * k + m : 2 * m * (k + 1)] = _ring_dots(Y, x)
            col = functools.partial(scalar_column, m)
            g, d = work[0], arena.direction
            out[col(P_GG)] = _dot(g, g, wide)
            if gd:
                out[col(P_GD)] = _dot(g, d, wide)
            if l1:
                out[col(P_GL1)] = torch.linalg.vector_norm(g, 1, dtype=torch.float64)
            out[col(P_GMAX)] = _max_abs(g)
            if pair:
                s, y = work[1], work[2]
                for index, (u, v) in ((P_SS, (s, s)), (P_SY, (s, y)), (P_YY, (y, y)), (P_SG, (s, g)), (P_YG, (y, g))):
                    out[col(index)] = _dot(u, v, wide)

    def local_rows(self, out: Tensor) -> None:
        """This plan's partial sums, one row per arena, into ``out`` (``[A, W]`` on the
        first arena's device): what a distributed plan completes over the ranks."""
        for a, row in enumerate(self.partials):
            out[a].copy_(row)

    def two_loop(self, loss: Tensor | None, pair: bool, direction: bool, rows: Tensor | None = None) -> None:
        m, home, read = self.m, self.home, self.read
        col = functools.partial(scalar_column, m)
        # rows: the per-arena sums completed elsewhere (a distributed plan), else this plan's.
        sums = torch.stack([p.to(home) for p in self.partials]) if rows is None else rows  # [A, W]
        totals = sums.sum(0)
        scales = torch.tensor(self.scales, dtype=torch.float64, device=home)
        if loss is not None:
            read[READ_LOSS].copy_(loss.reshape(()))
        read[READ_GTD] = (sums[:, col(P_GD)] * scales).sum()
        read[READ_GMAX] = sums[:, col(P_GMAX)].max()
        read[READ_GL1] = totals[col(P_GL1)]
        read[READ_GG] = totals[col(P_GG)]
        read[READ_FIXED:] = sums[:, col(P_DMAX)]
        if not direction:
            return
        cand, accept, slot, count, coef, dots = model(self.gram, self.pair_count, sums, m, pair)
        self.model[: 3 * m * m] = cand.reshape(-1)
        self.model[3 * m * m + MODEL_ACCEPT] = accept.double()
        self.model[3 * m * m + MODEL_SLOT] = slot.double()
        self.model[3 * m * m + MODEL_COUNT] = count.double()
        self.coef.copy_(coef)
        read[READ_GTD_NEXT] = ((dots @ coef) * scales).sum()

    def push(self, source: int, alphas: list[float]) -> None:
        m = self.m
        accept = self.model[3 * m * m + MODEL_ACCEPT]
        slot = self.model[3 * m * m + MODEL_SLOT].long().view(1)
        for a, arena in enumerate(self.arenas):
            self._pair(a, self._gradient(a, source), alphas[a])
            S, Y = arena.rings()
            weight = accept.to(arena.device, arena.history_dtype)
            here = slot.to(arena.device)
            stored = self.narrow[a] if self.narrow[a] is not None else self.work[a][1:]
            row = self.slot_rows[a]
            for ring, new in ((S, stored[0]), (Y, stored[1])):
                # The slot's row, or the pair where accepted (lerp with weight 0 or 1 is exact).
                torch.index_select(ring, 0, here, out=row)
                row[0].lerp_(new, weight)
                ring.index_copy_(0, here, row)
        self.gram.copy_(self.model[: 3 * m * m].view(3, m, m))
        self.pair_count.copy_(self.model[3 * m * m + MODEL_COUNT].long())

    def direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool,
                  push: bool) -> None:
        if push:
            self.push(source, alphas)
        m = self.m
        for a, arena in enumerate(self.arenas):
            g = self._gradient(a, source)
            coef = self.coef.to(arena.device)
            S, Y = arena.rings()
            if g.numel() and g.data_ptr() == arena.direction.data_ptr():
                raise AssertionError("the direction is not a gradient source")
            _combine(arena.direction, g, S, Y, coef[0], coef[1 : 1 + m], coef[1 + m :])
            self.partials[a][scalar_column(m, P_DMAX)] = _max_abs(arena.direction)  # read with the next evaluation
            if g.data_ptr() != arena.prev_grad.data_ptr():
                arena.prev_grad.copy_(g)
            if not arena.params:
                continue  # a distributed rank's empty slice
            if save:
                torch._foreach_copy_(self.saved_views[a], arena.local_params())
            if moves is not None:
                torch._foreach_add_(arena.local_params(), self.d_views[a], alpha=moves[a])

    def move(self, alphas: list[float], from_saved: bool) -> None:
        for a, arena in enumerate(self.arenas):
            if not arena.params:
                continue  # a distributed rank's empty slice
            if from_saved:
                torch._foreach_copy_(arena.local_params(), self.saved_views[a])
            torch._foreach_add_(arena.local_params(), self.d_views[a], alpha=alphas[a])


def _max_abs(x: Tensor) -> Tensor:
    """``max |x|``, 0 for an empty ``x`` (a distributed rank's empty slice)."""
    return torch.linalg.vector_norm(x, float("inf")) if x.numel() else x.new_zeros(())


def model(gram: Tensor, pair_count: Tensor, sums: Tensor, m: int, pair: bool):
    """The model of an evaluated point from the partial sums ``sums`` (``[A, W]``, one row
    per arena): the pair's acceptance, the candidate Gram matrices (the state's with the
    pair's row and column where accepted), its slot and the new pair count, the
    coefficients of ``d = -H g`` over ``[g, s_0 .. s_{m-1}, y_0 .. y_{m-1}]`` (slot order)
    and, per arena, the dots of ``g`` with that basis (``[A, 2m + 1]``: ``g . d`` of arena
    ``a`` is ``dots[a] @ coef``)."""
    col = functools.partial(scalar_column, m)
    totals = sums.sum(0)
    count = pair_count.reshape(())
    slot = torch.remainder(count, m)
    if pair:
        sy, yy = totals[col(P_SY)], totals[col(P_YY)]
        accept = torch.isfinite(sy) & (sy > CURVATURE_MIN) & torch.isfinite(yy) & torch.isfinite(totals[col(P_SS)])
    else:
        accept = torch.zeros((), dtype=torch.bool, device=gram.device)
    j = slot.view(1)

    def with_slot(vector: Tensor, value: Tensor) -> Tensor:
        return vector.index_copy(-1, j, value.reshape(*vector.shape[:-1], 1))

    R_s, R_y = totals[2 * m : 4 * m], totals[4 * m : 6 * m]
    ss_row = with_slot(R_s[:m], totals[col(P_SS)])  # s . s_i
    sy_row = with_slot(R_s[m:], totals[col(P_SY)])  # s . y_i: row slot of S Y^T
    ys_col = with_slot(R_y[:m], totals[col(P_SY)])  # s_i . y: column slot of S Y^T
    yy_row = with_slot(R_y[m:], totals[col(P_YY)])
    SS, SY, YY = gram.unbind(0)
    new = torch.stack([
        SS.index_copy(0, j, ss_row.unsqueeze(0)).index_copy(1, j, ss_row.unsqueeze(1)),
        SY.index_copy(0, j, sy_row.unsqueeze(0)).index_copy(1, j, ys_col.unsqueeze(1)),
        YY.index_copy(0, j, yy_row.unsqueeze(0)).index_copy(1, j, yy_row.unsqueeze(1)),
    ])
    cand = torch.where(accept, new, gram)
    # Per arena, g's dots with the candidate basis [g, S, Y].
    g_ring = sums[:, : 2 * m]
    g_pair = torch.stack([sums[:, col(P_SG)], sums[:, col(P_YG)]], 1)  # [A, 2]
    g_ring_new = torch.cat([with_slot(g_ring[:, :m], g_pair[:, 0]), with_slot(g_ring[:, m:], g_pair[:, 1])], 1)
    g_ring = torch.where(accept, g_ring_new, g_ring)
    dots = torch.cat([sums[:, col(P_GG)].unsqueeze(1), g_ring], 1)  # [A, 2m + 1]
    new_count = count + accept
    total_dots = dots.sum(0)
    coef = -two_loop(cand, total_dots[1 : 1 + m], total_dots[1 + m :], new_count, m)
    return cand, accept, slot, new_count, coef, dots


def two_loop(gram: Tensor, Sg: Tensor, Yg: Tensor, pair_count: Tensor, m: int) -> Tensor:
    """The coefficients of ``H g`` over ``[g, S, Y]`` (slot order), as
    ``csrc/ops.h`` ``two_loop_block`` finds them, in a fixed number of operations.

    Each loop of the recursion is a triangular solve (newest pair first, index ``k``):
    the first loop's ``alpha_k = (s_k.g - sum_{j<k} (s_k.y_j) alpha_j) / (s_k.y_k)`` is
    forward substitution with the lower triangle of ``S Y^T``; with ``H0 = gamma I`` and
    ``u = alpha - beta``, the second loop's ``(s_k.y_k) u_k + sum_{j>k} (s_j.y_k) u_j =
    (s_k.y_k) alpha_k - gamma (y_k.g - sum_j (y_k.y_j) alpha_j)`` is back substitution
    with the upper triangle of ``Y S^T``. Then ``H g = gamma g - gamma sum_k alpha_k y_k +
    sum_k u_k s_k``. An unheld slot becomes an identity row and column (``alpha = u = 0``);
    with no pair held ``gamma = 1``."""
    k = torch.arange(m, device=gram.device)
    count = pair_count.reshape(())
    slots = torch.remainder(count - 1 - k, m)  # newest first
    held = k < torch.clamp(count, max=m)
    both = held[:, None] & held[None, :]
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    SY = torch.where(both, gram[1][slots][:, slots], eye)
    YY = torch.where(both, gram[2][slots][:, slots], 0.0)
    Sg_k = torch.where(held, Sg[slots], 0.0)
    Yg_k = torch.where(held, Yg[slots], 0.0)
    diag = SY.diagonal()
    gamma = torch.where(held[0], diag[0] / torch.where(held[0], YY[0, 0], 1.0), 1.0)
    alpha = torch.linalg.solve_triangular(SY, Sg_k.unsqueeze(1), upper=False)[:, 0]
    rhs = diag * alpha - gamma * (Yg_k - YY @ alpha)
    u = torch.linalg.solve_triangular(SY.T, rhs.unsqueeze(1), upper=True)[:, 0]
    coef = torch.zeros(2 * m + 1, dtype=gram.dtype, device=gram.device)
    coef[0] = gamma
    coef[1:].index_copy_(0, torch.cat([slots, slots + m]), torch.cat([u, -gamma * alpha]))
    return coef
