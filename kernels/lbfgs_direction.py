"""LBFGS's direction pass and the line search's trial points (docs/design.md, "LBFGS";
the contract in ``csrc/lbfgs.h``).

``lbfgs_direction``: per element, with ``g`` the current point's gradient (the user's
``.grad`` or a flat buffer, as in :mod:`.lbfgs_gradient_dots`):

- ``PUSH``: where the model accepted the pair, its rows (``s = alpha d``, ``y = g - prev``,
  rounded to the history dtype) into the ring slot the model names;
- ``COMBINE``: ``d = c_g g + sum_i c_s[i] s_i + c_y[i] y_i`` over the held slots (the new
  pair's rows from registers), ``prev = g``, ``max |d|`` per worker into the partial
  rows; with ``SAVE`` the parameters copied to the saved point, with ``MOVE`` moved to
  ``x + move d``;
- ``COMMIT`` (the first arena's launch): program 0 copies the model's candidate Gram
  matrices and pair count into the state. Every other read of this launch is of the
  model scratch, so the order of programs does not matter.

``lbfgs_move``: ``x = saved + alpha d`` (``FROM_SAVED``) or ``x + alpha d``.

Launches: one per arena each. Bytes per element (float32): the direction reads
``E`` (g) ``+ 2 E`` (d, prev) ``+ 2 m H`` and writes ``2 E`` (d, prev), ``2 H`` with an
accepted pair, and with the move reads and writes ``E`` more (``+ E`` saved):
``(8m + 36) N``; a trial point reads ``2 E`` and writes ``E``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import TILE_COLUMNS, WORKER_COLUMNS, Launcher, tile_geometry, traceable, user_tensor, worker_geometry
from .lbfgs_common import MODEL_ACCEPT, MODEL_COUNT, MODEL_SLOT, NUM_SCALARS, P_DMAX, as_stored, gradient_tile

COPY_BLOCK = 1024


@triton.jit
def lbfgs_direction_kernel(
    addresses_ptr, tiles_ptr, workers_ptr, source_ptr, hist_s_ptr, hist_y_ptr, d_ptr, prev_ptr, saved_ptr,
    coef_ptr, model_ptr, partials_ptr, gram_ptr, pair_count_ptr, steps_ptr,
    M: tl.constexpr, HAS_SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr, PUSH: tl.constexpr,
    COMBINE: tl.constexpr, MOVE: tl.constexpr, SAVE: tl.constexpr, COMMIT: tl.constexpr, F64: tl.constexpr,
    TILE: tl.constexpr, ALIGNED: tl.constexpr, TCOL: tl.constexpr, WCOL: tl.constexpr, COPY: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32
    DT = d_ptr.dtype.element_ty
    HDT = hist_s_ptr.dtype.element_ty
    w = tl.program_id(0).to(tl.int64)
    block, tile_lo, tile_hi, tile_step, ring_origin, ring_stride = worker_geometry(workers_ptr, w, WCOL, ALIGNED)
    fixed = model_ptr + 3 * M * M
    if PUSH:
        accept = tl.load(fixed + MODEL_ACCEPT) > 0.5
    else:  # the ring holds whatever was pushed before
        accept = tl.load(fixed + MODEL_ACCEPT) < -1.0
    slot = tl.load(fixed + MODEL_SLOT).to(tl.int64)
    held = tl.minimum(tl.load(fixed + MODEL_COUNT).to(tl.int64), M)
    alpha = tl.load(steps_ptr).to(CDT)
    move = tl.load(steps_ptr + 1).to(CDT)
    c_g = tl.load(coef_ptr).to(CDT)
    lane = tl.arange(0, TILE)
    dmax = tl.full([], 0.0, tl.float64)
    for k in range(tile_lo, tile_hi, tile_step):
        start, count, param, local = tile_geometry(tiles_ptr, k, TCOL, ALIGNED)
        inside = lane < count
        g = gradient_tile(addresses_ptr, source_ptr, param, local, start, lane, count, DT, CDT,
                          HAS_SOURCE, MAXIMIZE, ALIGNED)
        d_old = tl.load(d_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        prev = tl.load(prev_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        s_new = as_stored(alpha * d_old, HDT, CDT)
        y_new = as_stored(g - prev, HDT, CDT)
        if PUSH:
            slot_ring = ring_origin + slot * ring_stride + start
            pushed = lane < tl.where(accept, count, 0)
            tl.store(hist_s_ptr + slot_ring + lane, s_new.to(HDT), mask=pushed)
            tl.store(hist_y_ptr + slot_ring + lane, y_new.to(HDT), mask=pushed)
        if COMBINE:
            d = g * c_g
            for i in range(M):
                ring = ring_origin + i * ring_stride + start
                mine = accept & (i == slot)  # the pair just pushed: from registers
                rows = lane < tl.where((i < held) & (mine == 0), count, 0)
                s_i = tl.load(hist_s_ptr + ring + lane, mask=rows, other=0.0).to(CDT)
                y_i = tl.load(hist_y_ptr + ring + lane, mask=rows, other=0.0).to(CDT)
                s_i = tl.where(mine, s_new, s_i)
                y_i = tl.where(mine, y_new, y_i)
                d = d + tl.load(coef_ptr + 1 + i).to(CDT) * s_i
                d = d + tl.load(coef_ptr + 1 + M + i).to(CDT) * y_i
            d_out = d.to(DT)
            tl.store(d_ptr + start + lane, d_out, mask=inside)
            tl.store(prev_ptr + start + lane, g.to(DT), mask=inside)
            dmax = tl.maximum(dmax, tl.max(tl.where(inside, tl.abs(d_out.to(tl.float64)), 0.0), axis=0))
            if SAVE | MOVE:
                theta_base, has_theta = user_tensor(addresses_ptr, param, 0, DT, ALIGNED)
                theta = tl.load(theta_base + local + lane, mask=inside, other=0.0)
                if SAVE:
                    tl.store(saved_ptr + start + lane, theta, mask=inside)
                if MOVE:
                    new = theta.to(CDT) + move * d_out.to(CDT)
                    tl.store(theta_base + local + lane, new.to(DT), mask=inside)
    if COMBINE:
        tl.store(partials_ptr + w * (6 * M + NUM_SCALARS) + 6 * M + P_DMAX, dmax)
    if COMMIT:
        if w == 0:
            flat = tl.arange(0, COPY)
            for i0 in range(0, 3 * M * M, COPY):
                i = i0 + flat
                tl.store(gram_ptr + i, tl.load(model_ptr + i, mask=i < 3 * M * M, other=0.0), mask=i < 3 * M * M)
            tl.store(pair_count_ptr, tl.load(fixed + MODEL_COUNT).to(tl.int64))


@triton.jit
def lbfgs_move_kernel(
    addresses_ptr, tiles_ptr, workers_ptr, saved_ptr, d_ptr, steps_ptr,
    FROM_SAVED: tl.constexpr, F64: tl.constexpr, TILE: tl.constexpr, ALIGNED: tl.constexpr,
    TCOL: tl.constexpr, WCOL: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32
    DT = d_ptr.dtype.element_ty
    w = tl.program_id(0).to(tl.int64)
    block, tile_lo, tile_hi, tile_step, ring_origin, ring_stride = worker_geometry(workers_ptr, w, WCOL, ALIGNED)
    alpha = tl.load(steps_ptr + 1).to(CDT)
    lane = tl.arange(0, TILE)
    for k in range(tile_lo, tile_hi, tile_step):
        start, count, param, local = tile_geometry(tiles_ptr, k, TCOL, ALIGNED)
        inside = lane < count
        theta_base, has_theta = user_tensor(addresses_ptr, param, 0, DT, ALIGNED)
        if FROM_SAVED:
            base = tl.load(saved_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        else:
            base = tl.load(theta_base + local + lane, mask=inside, other=0.0).to(CDT)
        d = tl.load(d_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        tl.store(theta_base + local + lane, (base + alpha * d).to(DT), mask=inside)


def _lbfgs_direction(
    addresses: Tensor, tiles: Tensor, workers: Tensor, source: Tensor | None, hist_s: Tensor, hist_y: Tensor,
    d: Tensor, prev: Tensor, saved: Tensor | None, coef: Tensor, model: Tensor, partials: Tensor,
    gram: Tensor | None, pair_count: Tensor | None, steps: Tensor, m: int, maximize: bool, push: bool,
    combine: bool, move: bool, tile: int, aligned: bool,
) -> None:
    traceable(lbfgs_direction_kernel)[(workers.shape[0],)](
        addresses, tiles, workers, d if source is None else source, hist_s, hist_y, d, prev,
        d if saved is None else saved, coef, model, partials, model if gram is None else gram,
        steps if pair_count is None else pair_count, steps,
        M=m, HAS_SOURCE=source is not None, MAXIMIZE=maximize, PUSH=push, COMBINE=combine, MOVE=move,
        SAVE=saved is not None, COMMIT=gram is not None, F64=d.dtype == torch.float64, TILE=tile,
        ALIGNED=aligned, TCOL=TILE_COLUMNS, WCOL=WORKER_COLUMNS, COPY=COPY_BLOCK,
    )


def _lbfgs_move(
    addresses: Tensor, tiles: Tensor, workers: Tensor, saved: Tensor | None, d: Tensor, steps: Tensor,
    tile: int, aligned: bool,
) -> None:
    traceable(lbfgs_move_kernel)[(workers.shape[0],)](
        addresses, tiles, workers, d if saved is None else saved, d, steps,
        FROM_SAVED=saved is not None, F64=d.dtype == torch.float64, TILE=tile, ALIGNED=aligned,
        TCOL=TILE_COLUMNS, WCOL=WORKER_COLUMNS,
    )


lbfgs_direction = Launcher(
    "lbfgs_direction", _lbfgs_direction, lbfgs_direction_kernel,
    ("hist_s", "hist_y", "d", "prev", "saved", "partials", "gram", "pair_count"),
)
lbfgs_move = Launcher("lbfgs_move", _lbfgs_move, lbfgs_move_kernel, ())
