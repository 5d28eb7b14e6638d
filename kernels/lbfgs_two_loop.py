"""LBFGS's model of an evaluated point: one program for all arenas (docs/design.md,
"LBFGS"; a port of ``csrc/lbfgs.h`` ``lbfgs_read`` and ``lbfgs_model``).

1. The workers' partial rows summed per arena, in row order (maxima for ``max |g|``
   and ``max |d|``), into ``sums[a]``, and over the arenas into ``sums[A]``.
2. The read vector: the loss, ``g . p`` of a trial (``p`` the step direction,
   ``scales[a] d`` on arena ``a``), ``max |g|``, ``|g|_1``, ``g.g``, each arena's ``max |d|``.
3. With ``DIRECTION``: the pair's acceptance (``s.y > 1e-10``, finite), the candidate
   Gram matrices into the model scratch (the state's, with the pair's row and column
   where accepted), the two-loop recursion on them (the loops of
   ``kernels/two_loop.py``, vectors of ``MP`` slots), the coefficients of ``d = -H g`` and
   its ``g . p`` from the dots alone. The state is not written: the direction pass
   commits the model.

Launches: one per evaluation. Bytes: none per element; ``(A + 1)`` rows of ``6m + 10``
sums and ``6 m^2`` Gram entries, whatever ``N``.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import Launcher, padded, traceable
from .lbfgs_common import (
    CURVATURE_MIN,
    MODEL_ACCEPT,
    MODEL_COUNT,
    MODEL_SLOT,
    NUM_SCALARS,
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
)
from .common import is_finite

COLUMN_BLOCK = 128  # columns summed at a time
ROW_BLOCK = 16  # partial rows loaded at a time
COPY_BLOCK = 1024  # Gram entries copied at a time


@triton.jit
def _scalar(ptr):
    return tl.load(ptr).to(tl.float64)


@triton.jit
def lbfgs_two_loop_kernel(
    partials_ptr, arena_rows_ptr, scales_ptr, loss_ptr, gram_ptr, pair_count_ptr, sums_ptr, model_ptr,
    coef_ptr, read_ptr, A,
    M: tl.constexpr, MP: tl.constexpr, CB: tl.constexpr, ROWS: tl.constexpr, COPY: tl.constexpr,
    HAS_LOSS: tl.constexpr, PAIR: tl.constexpr, DIRECTION: tl.constexpr,
):
    W: tl.constexpr = 6 * M + NUM_SCALARS
    cols = tl.arange(0, CB)
    rows = tl.arange(0, ROWS)
    # 1. Per arena, its rows in order; then the total over the arenas.
    for a in range(A):
        lo = tl.load(arena_rows_ptr + a)
        hi = tl.load(arena_rows_ptr + a + 1)
        for c0 in range(0, W, CB):
            c = c0 + cols
            cmask = c < W
            is_max = (c == 6 * M + P_GMAX) | (c == 6 * M + P_DMAX)
            acc = tl.zeros([CB], dtype=tl.float64)
            top = tl.zeros([CB], dtype=tl.float64)
            for r0 in range(lo, hi, ROWS):
                r = r0 + rows
                mask = (r[:, None] < hi) & cmask[None, :]
                block = tl.load(partials_ptr + r[:, None] * W + c[None, :], mask=mask, other=0.0)
                acc += tl.sum(block, axis=0)
                top = tl.maximum(top, tl.max(block, axis=0))
            tl.store(sums_ptr + a * W + c, tl.where(is_max, top, acc), mask=cmask)
    tl.debug_barrier()
    for c0 in range(0, W, CB):
        c = c0 + cols
        cmask = c < W
        is_max = (c == 6 * M + P_GMAX) | (c == 6 * M + P_DMAX)
        total = tl.zeros([CB], dtype=tl.float64)
        for a in range(A):
            row = tl.load(sums_ptr + a * W + c, mask=cmask, other=0.0)
            total = tl.where(is_max, tl.maximum(total, row), total + row)
        tl.store(sums_ptr + A * W + c, total, mask=cmask)
    tl.debug_barrier()

    # 2. The read vector.
    total = sums_ptr + A * W
    sc = total + 6 * M
    gtd = tl.full([], 0.0, tl.float64)
    for a in range(A):
        gtd += _scalar(scales_ptr + a) * _scalar(sums_ptr + a * W + 6 * M + P_GD)
        tl.store(read_ptr + READ_FIXED + a, _scalar(sums_ptr + a * W + 6 * M + P_DMAX))
    tl.store(read_ptr + READ_GTD, gtd)
    tl.store(read_ptr + READ_GMAX, _scalar(sc + P_GMAX))
    tl.store(read_ptr + READ_GL1, _scalar(sc + P_GL1))
    tl.store(read_ptr + READ_GG, _scalar(sc + P_GG))
    if HAS_LOSS:
        tl.store(read_ptr + READ_LOSS, _scalar(loss_ptr))
    if not DIRECTION:
        return

    # 3. The pair's acceptance and the candidate Gram matrices (slot order).
    count = tl.load(pair_count_ptr)
    slot = count % M
    ss = _scalar(sc + P_SS)
    sy = _scalar(sc + P_SY)
    yy = _scalar(sc + P_YY)
    accept = is_finite(sy) & (sy > CURVATURE_MIN) & is_finite(yy) & is_finite(ss)
    if not PAIR:
        accept = accept & (count < 0)  # no candidate: never
    flat = tl.arange(0, COPY)
    for i0 in range(0, 3 * M * M, COPY):
        i = i0 + flat
        tl.store(model_ptr + i, tl.load(gram_ptr + i, mask=i < 3 * M * M, other=0.0), mask=i < 3 * M * M)
    tl.debug_barrier()
    j = tl.arange(0, MP)
    valid = j < M
    own = j == slot
    SS_ptr, SY_ptr, YY_ptr = model_ptr, model_ptr + M * M, model_ptr + 2 * M * M  # SY[i, j] = s_i . y_j
    ss_row = tl.where(own, ss, tl.load(total + 2 * M + j, mask=valid, other=0.0))  # s . s_j
    sy_row = tl.where(own, sy, tl.load(total + 3 * M + j, mask=valid, other=0.0))  # s . y_j
    ys_col = tl.where(own, sy, tl.load(total + 4 * M + j, mask=valid, other=0.0))  # s_j . y
    yy_row = tl.where(own, yy, tl.load(total + 5 * M + j, mask=valid, other=0.0))
    write = j < tl.where(accept, M, 0)  # (a vector & a scalar bool does not interpret)
    tl.store(SS_ptr + slot * M + j, ss_row, mask=write)
    tl.store(SS_ptr + j * M + slot, ss_row, mask=write)
    tl.store(SY_ptr + slot * M + j, sy_row, mask=write)
    tl.store(SY_ptr + j * M + slot, ys_col, mask=write)
    tl.store(YY_ptr + slot * M + j, yy_row, mask=write)
    tl.store(YY_ptr + j * M + slot, yy_row, mask=write)
    tl.debug_barrier()
    pair_count = count + accept.to(tl.int64)
    mine = j == tl.where(accept, slot, -1)
    Sg = tl.where(mine, _scalar(sc + P_SG), tl.load(total + j, mask=valid, other=0.0))
    Yg = tl.where(mine, _scalar(sc + P_YG), tl.load(total + M + j, mask=valid, other=0.0))

    # The two-loop recursion on the candidate model (kernels/two_loop.py's loops).
    n_held = tl.minimum(pair_count, M)
    age = (pair_count - 1 - j + M) % M
    held = valid & (age < n_held)
    sy_diag = tl.load(SY_ptr + j * M + j, mask=valid, other=1.0)
    rho = tl.where(held, 1.0 / tl.where(held, sy_diag, 1.0), 0.0)
    c_g = tl.full([], 1.0, tl.float64)
    c_s = tl.zeros([MP], dtype=tl.float64)
    c_y = tl.zeros([MP], dtype=tl.float64)
    alpha = tl.zeros([MP], dtype=tl.float64)
    for k in range(M):
        here_slot = (pair_count - 1 - k + M) % M
        here = j == tl.where(k < n_held, here_slot, -1)
        s_dot_q = (
            c_g * tl.sum(tl.where(here, Sg, 0.0), axis=0)
            + tl.sum(tl.load(SS_ptr + here_slot * M + j, mask=valid, other=0.0) * c_s, axis=0)
            + tl.sum(tl.load(SY_ptr + here_slot * M + j, mask=valid, other=0.0) * c_y, axis=0)
        )
        alpha_k = tl.sum(tl.where(here, rho, 0.0), axis=0) * s_dot_q
        alpha = tl.where(here, alpha_k, alpha)
        c_y = tl.where(here, c_y - alpha_k, c_y)
    any_held = n_held > 0
    newest = (pair_count - 1 + M) % M
    yy_newest = tl.where(any_held, tl.load(YY_ptr + newest * M + newest), 1.0)
    gamma = tl.where(any_held, tl.load(SY_ptr + newest * M + newest) / yy_newest, 1.0)
    c_g, c_s, c_y = gamma * c_g, gamma * c_s, gamma * c_y
    for back in range(M):
        here_slot = (pair_count + back) % M  # the slot of k = M - 1 - back
        here = j == tl.where(M - 1 - back < n_held, here_slot, -1)
        y_dot_r = (
            c_g * tl.sum(tl.where(here, Yg, 0.0), axis=0)
            + tl.sum(tl.load(SY_ptr + j * M + here_slot, mask=valid, other=0.0) * c_s, axis=0)
            + tl.sum(tl.load(YY_ptr + here_slot * M + j, mask=valid, other=0.0) * c_y, axis=0)
        )
        beta = tl.sum(tl.where(here, rho, 0.0), axis=0) * y_dot_r
        c_s = tl.where(here, c_s + (alpha - beta), c_s)
    # d = -H g.
    c_g, c_s, c_y = -c_g, -c_s, -c_y
    tl.store(coef_ptr, c_g)
    tl.store(coef_ptr + 1 + j, c_s, mask=valid)
    tl.store(coef_ptr + 1 + M + j, c_y, mask=valid)
    gtd_next = tl.full([], 0.0, tl.float64)
    for a in range(A):
        row = sums_ptr + a * W
        g_s = tl.where(mine, _scalar(row + 6 * M + P_SG), tl.load(row + j, mask=valid, other=0.0))
        g_y = tl.where(mine, _scalar(row + 6 * M + P_YG), tl.load(row + M + j, mask=valid, other=0.0))
        dot = c_g * _scalar(row + 6 * M + P_GG) + tl.sum(c_s * g_s, axis=0) + tl.sum(c_y * g_y, axis=0)
        gtd_next += _scalar(scales_ptr + a) * dot
    tl.store(read_ptr + READ_GTD_NEXT, gtd_next)
    fixed = model_ptr + 3 * M * M
    tl.store(fixed + MODEL_ACCEPT, accept.to(tl.float64))
    tl.store(fixed + MODEL_SLOT, slot.to(tl.float64))
    tl.store(fixed + MODEL_COUNT, pair_count.to(tl.float64))


def _lbfgs_two_loop(
    partials: Tensor, arena_rows: Tensor, scales: Tensor, loss: Tensor | None, gram: Tensor,
    pair_count: Tensor, sums: Tensor, model: Tensor, coef: Tensor, read: Tensor, m: int, pair: bool,
    direction: bool,
) -> None:
    traceable(lbfgs_two_loop_kernel)[(1,)](
        partials, arena_rows, scales, read if loss is None else loss, gram, pair_count, sums, model, coef,
        read, scales.shape[0],
        M=m, MP=padded(m), CB=COLUMN_BLOCK, ROWS=ROW_BLOCK, COPY=COPY_BLOCK, HAS_LOSS=loss is not None,
        PAIR=pair, DIRECTION=direction,
    )


lbfgs_two_loop = Launcher(
    "lbfgs_two_loop", _lbfgs_two_loop, lbfgs_two_loop_kernel, ("sums", "model", "coef", "read")
)
