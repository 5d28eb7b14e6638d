"""LBFGS, after each closure evaluation: the gradient's dots with the ring and the pair
candidate (docs/design.md, "LBFGS"; the contract in ``csrc/lbfgs.h``).

Per worker (``mlbfgs_fused.kernels.common``'s geometry; an LBFGS arena is one block),
one row of float64 partial sums: ``g . r_i``, and with a pair candidate (``s = alpha d``,
``y = g - prev``, rounded to the history dtype as the ring would store them) ``s . r_i``
and ``y . r_i``, for the ring rows ``r = s_0 .. s_{m-1}, y_0 .. y_{m-1}`` of the held
slots; then ``g.g``, ``g.d``, ``s.s``, ``s.y``, ``y.y``, ``s.g``, ``y.g`` (float64
products), ``|g|_1`` and ``max |g|``. ``g`` is the user's gradient through the address
table (negated under ``maximize``, zero where a parameter has none) or a flat buffer of
the arena (``HAS_SOURCE``: a kept gradient, ``prev_grad``).

Launches: one per arena, one program per worker. Bytes per element (``E`` parameter
bytes, ``H`` history bytes): reads ``E`` (g) ``+ E`` (d) ``+ 2 m H`` (the held rows, masked
loads elsewhere), and with a pair candidate ``E`` more (prev): ``(8m + 12) N`` in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TILE_COLUMNS, WORKER_COLUMNS, Launcher, padded, tile_geometry, traceable, user_tensor, worker_geometry
from .lbfgs_common import NUM_SCALARS, P_GD, P_GG, P_GL1, P_GMAX, P_SG, P_SS, P_SY, P_YG, P_YY, as_stored, gradient_tile


@triton.jit
def lbfgs_gradient_dots_kernel(
    addresses_ptr, tiles_ptr, workers_ptr, source_ptr, hist_s_ptr, hist_y_ptr, d_ptr, prev_ptr,
    pair_count_ptr, steps_ptr, partials_ptr,
    M: tl.constexpr, MP: tl.constexpr, HAS_SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr,
    PAIR: tl.constexpr, RING: tl.constexpr, F64: tl.constexpr, TILE: tl.constexpr,
    ALIGNED: tl.constexpr, TCOL: tl.constexpr, WCOL: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32
    DT = d_ptr.dtype.element_ty
    HDT = hist_s_ptr.dtype.element_ty
    w = tl.program_id(0).to(tl.int64)
    block, tile_lo, tile_hi, tile_step, ring_origin, ring_stride = worker_geometry(workers_ptr, w, WCOL, ALIGNED)
    held = tl.minimum(tl.load(pair_count_ptr), M)
    alpha = tl.load(steps_ptr).to(CDT)  # s = alpha d

    lane = tl.arange(0, TILE)
    j = tl.arange(0, MP)
    acc_gs = tl.zeros([MP], dtype=tl.float64)
    acc_gy = tl.zeros([MP], dtype=tl.float64)
    acc_ss = tl.zeros([MP], dtype=tl.float64)
    acc_sy = tl.zeros([MP], dtype=tl.float64)
    acc_ys = tl.zeros([MP], dtype=tl.float64)
    acc_yy = tl.zeros([MP], dtype=tl.float64)
    gg = tl.full([], 0.0, tl.float64)
    gd = tl.full([], 0.0, tl.float64)
    gl1 = tl.full([], 0.0, tl.float64)
    gmax = tl.full([], 0.0, tl.float64)
    ss = tl.full([], 0.0, tl.float64)
    sy = tl.full([], 0.0, tl.float64)
    yy = tl.full([], 0.0, tl.float64)
    sg = tl.full([], 0.0, tl.float64)
    yg = tl.full([], 0.0, tl.float64)
    for k in range(tile_lo, tile_hi, tile_step):
        start, count, param, local = tile_geometry(tiles_ptr, k, TCOL, ALIGNED)
        inside = lane < count
        g = gradient_tile(addresses_ptr, source_ptr, param, local, start, lane, count, DT, CDT,
                          HAS_SOURCE, MAXIMIZE, ALIGNED)
        d = tl.load(d_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        g64 = g.to(tl.float64)
        gg += tl.sum(g64 * g64, axis=0)
        gd += tl.sum(g64 * d.to(tl.float64), axis=0)
        gl1 += tl.sum(tl.abs(g64), axis=0)
        gmax = tl.maximum(gmax, tl.max(tl.abs(g64), axis=0))
        if PAIR:
            prev = tl.load(prev_ptr + start + lane, mask=inside, other=0.0).to(CDT)
            s = as_stored(alpha * d, HDT, CDT)
            y = as_stored(g - prev, HDT, CDT)
            s64, y64 = s.to(tl.float64), y.to(tl.float64)
            ss += tl.sum(s64 * s64, axis=0)
            sy += tl.sum(s64 * y64, axis=0)
            yy += tl.sum(y64 * y64, axis=0)
            sg += tl.sum(s64 * g64, axis=0)
            yg += tl.sum(y64 * g64, axis=0)
        if RING:
            for i in range(M):
                ring = ring_origin + i * ring_stride + start
                rows = lane < tl.where(i < held, count, 0)  # masked: the rows of unheld slots are not read
                s_i = tl.load(hist_s_ptr + ring + lane, mask=rows, other=0.0).to(CDT)
                y_i = tl.load(hist_y_ptr + ring + lane, mask=rows, other=0.0).to(CDT)
                here = j == i
                acc_gs += tl.where(here, tl.sum(s_i * g, axis=0).to(tl.float64), 0.0)
                acc_gy += tl.where(here, tl.sum(y_i * g, axis=0).to(tl.float64), 0.0)
                if PAIR:
                    acc_ss += tl.where(here, tl.sum(s_i * s, axis=0).to(tl.float64), 0.0)
                    acc_sy += tl.where(here, tl.sum(y_i * s, axis=0).to(tl.float64), 0.0)
                    acc_ys += tl.where(here, tl.sum(s_i * y, axis=0).to(tl.float64), 0.0)
                    acc_yy += tl.where(here, tl.sum(y_i * y, axis=0).to(tl.float64), 0.0)

    width = 6 * M + NUM_SCALARS
    out = partials_ptr + w * width
    valid = j < M
    if RING:
        tl.store(out + j, acc_gs, mask=valid)
        tl.store(out + M + j, acc_gy, mask=valid)
        if PAIR:
            tl.store(out + 2 * M + j, acc_ss, mask=valid)
            tl.store(out + 3 * M + j, acc_sy, mask=valid)
            tl.store(out + 4 * M + j, acc_ys, mask=valid)
            tl.store(out + 5 * M + j, acc_yy, mask=valid)
    scalars = out + 6 * M
    tl.store(scalars + P_GG, gg)
    tl.store(scalars + P_GD, gd)
    tl.store(scalars + P_GL1, gl1)
    tl.store(scalars + P_GMAX, gmax)
    if PAIR:
        tl.store(scalars + P_SS, ss)
        tl.store(scalars + P_SY, sy)
        tl.store(scalars + P_YY, yy)
        tl.store(scalars + P_SG, sg)
        tl.store(scalars + P_YG, yg)


def _lbfgs_gradient_dots(
    addresses: Tensor, tiles: Tensor, workers: Tensor, source: Tensor | None, hist_s: Tensor,
    hist_y: Tensor, d: Tensor, prev: Tensor, pair_count: Tensor, steps: Tensor, partials: Tensor,
    m: int, maximize: bool, pair: bool, ring: bool, tile: int, aligned: bool,
) -> None:
    traceable(lbfgs_gradient_dots_kernel)[(workers.shape[0],)](
        addresses, tiles, workers, d if source is None else source, hist_s, hist_y, d, prev, pair_count,
        steps, partials,
        M=m, MP=padded(m), HAS_SOURCE=source is not None, MAXIMIZE=maximize, PAIR=pair, RING=ring,
        F64=d.dtype == torch.float64, TILE=tile, ALIGNED=aligned, TCOL=TILE_COLUMNS, WCOL=WORKER_COLUMNS,
    )


lbfgs_gradient_dots = Launcher(
    "lbfgs_gradient_dots", _lbfgs_gradient_dots, lbfgs_gradient_dots_kernel, ("partials",)
)
