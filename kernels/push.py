"""The pair push (docs/design.md, "The step", 7) and the step's counters: two launches.

Both are launched every step and decide on the device, from the step counter and
the step's global verdict ``ok``, whether a pair is due (``t % T == 0``); when none
is, the push programs return at once and the commit only counts.

:func:`push_kernel`, one program per worker. On a due step it reads the block's
``(phi, accepted)``, decided once per block by the coefficient kernel. When the pair
is accepted each worker recomputes its tiles of ``s`` and ``yhat = lerp(s, y, phi)``
from the averages, the snapshots and the newest pair, writes them into ring slot
``pair_count % m`` in the history dtype, and sums the inner products of the rows
*as stored* with every ring row into its row of partials, so the Gram matrices
stay those of the ring even when it is narrower than the parameters (the
vector-free ``||d||`` depends on it). Every due step then rolls the snapshots
(``P0 = P``, ``G0 = G``).
Bytes per element on a due step with a pair accepted: reads ``4 E`` (P, P0, G, G0)
``+ 2 m H`` (the ring, newest pair included); writes ``2 H`` (the slot) ``+ 2 E``
(snapshots). float32: ``(8m + 32) N`` every ``T`` steps (the newest pair, read twice, is
the same tile: the second read hits the cache); nothing per element otherwise.
``variant="released"`` runs the push before pass 2 (E4): it forms this step's
averages itself (``+ 2 E``: theta and grad) and replaces each worker's pass-1 ``S g``,
``Y g`` entries of the slot with the new pair's, so the coefficients use it at once.

:func:`commit_kernel`, one program per block, is the only writer of the counters
(every other kernel reads them, so the commit runs last; the released variant
commits the pair before its coefficients and the counters last): ``step += ok``,
``skipped_steps += not ok`` and, on a pair-forming step, row and column ``slot`` of
``S S^T``, ``S Y^T``, ``Y Y^T`` from the push kernel's partials (at most ``cap``
rows per block, fixed order), ``pair_count`` or ``skipped_pairs``. Bytes: none per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    BLOCK_COLUMNS,
    DECISION_COLUMNS,
    H_PAIR_MOMENTUM,
    H_WEIGHT_DECAY,
    SUM_ROWS,
    TILE_COLUMNS,
    WORKER_COLUMNS,
    Launcher,
    averages,
    effective_gradient,
    lerp,
    padded,
    pair_candidate,
    sum_rows,
    tile_geometry,
    to_storage,
    traceable,
    user_tensor,
    worker_geometry,
)


@triton.jit
def push_kernel(
    param_ema_ptr, grad_ema_ptr, param_snap_ptr, grad_snap_ptr, hist_s_ptr, hist_y_ptr,
    tiles_ptr, workers_ptr, decision_ptr, gram_partials_ptr, hyper_ptr, step_ptr,
    pair_count_ptr, ok_ptr, period, addresses_ptr, scale_ptr, dot_partials_ptr,
    M: tl.constexpr, MP: tl.constexpr, F64: tl.constexpr, TILE: tl.constexpr,
    ALIGNED: tl.constexpr, TCOL: tl.constexpr, WCOL: tl.constexpr,
    RELEASED: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32  # arithmetic type of the arena
    DT = param_ema_ptr.dtype.element_ty  # the parameters' dtype
    w = tl.program_id(0).to(tl.int64)
    b, tile_lo, tile_hi, tile_step, ring_origin, ring_stride = worker_geometry(workers_ptr, w, WCOL, ALIGNED)
    t = tl.load(step_ptr + b) + 1
    if (tl.load(ok_ptr) == 0) | (t % period != 0):
        return  # no pair due: nothing per element

    decision = decision_ptr + b * DECISION_COLUMNS
    phi = tl.load(decision).to(CDT)
    accepted = tl.load(decision + 1) != 0  # false before the first snapshot (t == T)
    pair_count = tl.load(pair_count_ptr + b)
    slot = pair_count % M
    newest = ring_origin + ((pair_count - 1 + M) % M) * ring_stride
    r = tl.where(pair_count > 0, tl.load(hyper_ptr + H_PAIR_MOMENTUM), 0.0).to(CDT)
    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    j = tl.arange(0, MP)
    ss_row = tl.zeros([MP], dtype=tl.float64)  # S S^T [slot, j]
    sy_col = tl.zeros([MP], dtype=tl.float64)  # S Y^T [j, slot]
    ys_row = tl.zeros([MP], dtype=tl.float64)  # S Y^T [slot, j]
    yy_row = tl.zeros([MP], dtype=tl.float64)  # Y Y^T [slot, j]
    s_dot_g = tl.full([], 0.0, tl.float64)  # released: the new pair's dots with g
    y_dot_g = tl.full([], 0.0, tl.float64)
    weight_decay = tl.load(hyper_ptr + H_WEIGHT_DECAY).to(CDT)
    grad_scale = tl.load(hyper_ptr).to(CDT)  # unused unless HAS_SCALE
    if HAS_SCALE:
        grad_scale = tl.load(scale_ptr).to(CDT)
    for k in range(tile_lo, tile_hi, tile_step):
        start, count, param, local = tile_geometry(tiles_ptr, k, TCOL, ALIGNED)
        inside = lane < count
        P = tl.load(param_ema_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        G = tl.load(grad_ema_ptr + start + lane, mask=inside, other=0.0).to(CDT)
        g = tl.zeros([TILE], dtype=CDT)
        if RELEASED:  # E4: the pair is pushed before the update: this step's averages here
            theta_base, _ = user_tensor(addresses_ptr, param, 0, DT, ALIGNED)
            grad_base, present = user_tensor(addresses_ptr, param, 1, DT, ALIGNED)
            live = lane < tl.where(present, count, 0)
            theta = tl.load(theta_base + local + lane, mask=live, other=0.0).to(CDT)
            grad = tl.load(grad_base + local + lane, mask=live, other=0.0).to(CDT)
            g = effective_gradient(grad, theta, weight_decay, grad_scale, HAS_WD, MAXIMIZE, HAS_SCALE)
            g = tl.where(live, g, 0.0)
            P, G = averages(P, G, theta, g, live, t == 1, hyper_ptr, CDT, DT, RELEASED)
        if accepted:
            s, y = pair_candidate(
                P,
                tl.load(param_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
                G,
                tl.load(grad_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
                tl.load(hist_s_ptr + newest + start + lane, mask=inside, other=0.0).to(CDT),
                tl.load(hist_y_ptr + newest + start + lane, mask=inside, other=0.0).to(CDT),
                r,
            )
            s_row = to_storage(s, hist_s_ptr.dtype.element_ty)
            yhat_row = to_storage(lerp(s, y, phi), hist_y_ptr.dtype.element_ty)
            ring = ring_origin + slot * ring_stride + start
            tl.store(hist_s_ptr + ring + lane, s_row, mask=inside)
            tl.store(hist_y_ptr + ring + lane, yhat_row, mask=inside)
            # Inner products of the rows as stored with every row of the ring.
            s = s_row.to(CDT)
            yhat = yhat_row.to(CDT)
            if RELEASED:
                s_dot_g += tl.sum(s * g, axis=0).to(tl.float64)
                y_dot_g += tl.sum(yhat * g, axis=0).to(tl.float64)
            for i in range(M):
                ring_i = ring_origin + i * ring_stride + start
                other = lane < tl.where(i == slot, 0, count)  # the slot itself: the new rows
                s_i = tl.load(hist_s_ptr + ring_i + lane, mask=other, other=0.0).to(CDT)
                y_i = tl.load(hist_y_ptr + ring_i + lane, mask=other, other=0.0).to(CDT)
                s_i = tl.where(i == slot, s, s_i)
                y_i = tl.where(i == slot, yhat, y_i)
                here = j == i
                ss_row += tl.where(here, tl.sum(s_i * s, axis=0).to(tl.float64), 0.0)
                sy_col += tl.where(here, tl.sum(s_i * yhat, axis=0).to(tl.float64), 0.0)
                ys_row += tl.where(here, tl.sum(y_i * s, axis=0).to(tl.float64), 0.0)
                yy_row += tl.where(here, tl.sum(y_i * yhat, axis=0).to(tl.float64), 0.0)
        tl.store(param_snap_ptr + start + lane, P.to(DT), mask=inside)
        tl.store(grad_snap_ptr + start + lane, G.to(DT), mask=inside)
    if accepted:
        out = gram_partials_ptr + w * 4 * M
        valid = j < M
        tl.store(out + j, ss_row, mask=valid)
        tl.store(out + M + j, sy_col, mask=valid)
        tl.store(out + 2 * M + j, ys_row, mask=valid)
        tl.store(out + 3 * M + j, yy_row, mask=valid)
        if RELEASED:  # pass 1 ran on the old ring: the slot's dots are the new pair's now
            dots = dot_partials_ptr + w * (2 * M + 1)
            tl.store(dots + slot, s_dot_g)
            tl.store(dots + M + slot, y_dot_g)


@triton.jit
def commit_kernel(
    blocks_ptr, decision_ptr, gram_partials_ptr, gram_ptr, step_ptr, pair_count_ptr,
    skipped_pairs_ptr, skipped_steps_ptr, ok_ptr, period,
    M: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr, BCOL: tl.constexpr,
    PAIR: tl.constexpr, STEP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ok = tl.load(ok_ptr).to(tl.int64)
    t = tl.load(step_ptr + b) + ok
    if PAIR:
        if (ok != 0) & (t % period == 0) & (t > period):  # a pair formed
            accepted = tl.load(decision_ptr + b * DECISION_COLUMNS + 1) != 0
            pair_count = tl.load(pair_count_ptr + b)
            if accepted:
                row_lo = tl.load(blocks_ptr + b * BCOL + 2)
                row_hi = tl.load(blocks_ptr + b * BCOL + 3)
                slot = pair_count % M
                j = tl.arange(0, MP)
                valid = j < M
                width = 4 * M
                ss_row = sum_rows(gram_partials_ptr, width, j, valid, row_lo, row_hi, ROWS)
                sy_col = sum_rows(gram_partials_ptr, width, M + j, valid, row_lo, row_hi, ROWS)
                ys_row = sum_rows(gram_partials_ptr, width, 2 * M + j, valid, row_lo, row_hi, ROWS)
                yy_row = sum_rows(gram_partials_ptr, width, 3 * M + j, valid, row_lo, row_hi, ROWS)
                gram = gram_ptr + b * 3 * M * M
                mm = M * M
                tl.store(gram + slot * M + j, ss_row, mask=valid)
                tl.store(gram + j * M + slot, ss_row, mask=valid)
                tl.store(gram + mm + slot * M + j, ys_row, mask=valid)  # [slot, j] = s . y_j
                tl.store(gram + mm + j * M + slot, sy_col, mask=valid)  # [j, slot] = s_j . yhat
                tl.store(gram + 2 * mm + slot * M + j, yy_row, mask=valid)
                tl.store(gram + 2 * mm + j * M + slot, yy_row, mask=valid)
            tl.store(pair_count_ptr + b, pair_count + accepted.to(tl.int64))
            skipped = 1 - accepted.to(tl.int64)
            tl.store(skipped_pairs_ptr + b, tl.load(skipped_pairs_ptr + b) + skipped)
    if STEP:  # last: every other kernel reads the step counter
        tl.store(step_ptr + b, t)
        tl.store(skipped_steps_ptr + b, tl.load(skipped_steps_ptr + b) + (1 - ok))


def _push(
    param_ema: Tensor, grad_ema: Tensor, param_snap: Tensor, grad_snap: Tensor,
    hist_s: Tensor, hist_y: Tensor, tiles: Tensor, workers: Tensor, decision: Tensor,
    gram_partials: Tensor, hyper: Tensor, step: Tensor, pair_count: Tensor, ok: Tensor,
    addresses: Tensor, scale: Tensor, dot_partials: Tensor,
    period: int, m: int, tile: int, aligned: bool,
    released: bool, has_wd: bool, maximize: bool, has_scale: bool,
) -> None:
    traceable(push_kernel)[(workers.shape[0],)](
        param_ema, grad_ema, param_snap, grad_snap, hist_s, hist_y, tiles, workers, decision,
        gram_partials, hyper, step, pair_count, ok, period, addresses, scale, dot_partials,
        M=m, MP=padded(m), F64=param_ema.dtype == torch.float64, TILE=tile, ALIGNED=aligned,
        TCOL=TILE_COLUMNS, WCOL=WORKER_COLUMNS, RELEASED=released, HAS_WD=has_wd,
        MAXIMIZE=maximize, HAS_SCALE=has_scale,
    )


def _commit(
    blocks: Tensor, decision: Tensor, gram_partials: Tensor, gram: Tensor, step: Tensor,
    pair_count: Tensor, skipped_pairs: Tensor, skipped_steps: Tensor, ok: Tensor,
    period: int, m: int, pair: bool, counters: bool,
) -> None:
    traceable(commit_kernel)[(blocks.shape[0],)](
        blocks, decision, gram_partials, gram, step, pair_count, skipped_pairs, skipped_steps,
        ok, period,
        M=m, MP=padded(m), ROWS=SUM_ROWS, BCOL=BLOCK_COLUMNS, PAIR=pair, STEP=counters,
    )


push = Launcher(
    "push", _push, push_kernel,
    ("param_snap", "grad_snap", "hist_s", "hist_y", "gram_partials", "dot_partials"),
)
commit = Launcher(
    "commit", _commit, commit_kernel,
    ("gram", "step", "pair_count", "skipped_pairs", "skipped_steps"),
)
