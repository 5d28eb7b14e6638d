"""The pair push (DESIGN.md section 2 step 7) and the step's counters: two launches.

Both are launched every step and decide on the device, from the step counter and
the group's finiteness (the stats rows), whether a pair is due (``t % T == 0``);
when none is, the push programs return at once and the commit only counts.

:func:`push_kernel`, one program per tile. On a due step the sums of pass 2's
partials (``s.s``, ``s.y``, ``y.y``, added per block in a fixed order, the same in
every program) give the damping factor ``phi``, ``s.yhat = phi s.y + (1 - phi) s.s``
and the acceptance test. When the pair is accepted each program recomputes its
tile of ``s`` and ``yhat = lerp(s, y, phi)`` from the EMAs, the snapshots and the
newest pair, writes them into ring slot ``pair_count % m`` in the history dtype,
and leaves the inner products of the rows *as stored* with every ring row, so the
Gram matrices stay those of the ring even when it is narrower than the
parameters (the vector-free ``||d||`` depends on it). Every due step then rolls
the snapshots (``P0 = P``, ``G0 = G``).
Bytes per element on a due step with a pair accepted: reads ``4 E`` (P, P0, G, G0)
``+ 2 m H`` (the ring, newest pair included); writes ``2 H`` (the slot) ``+ 2 E``
(snapshots). float32: ``(8m + 32) N`` every ``T`` steps; nothing per element otherwise.

:func:`commit_kernel`, one program per block, is the only writer of the counters
(every other kernel reads them, so the commit runs last): ``step += finite``,
``skipped_steps += not finite`` and, on a pair-forming step, row and column
``slot`` of ``S S^T``, ``S Y^T``, ``Y Y^T`` from the push kernel's sums (fixed
order), ``pair_count`` or ``skipped_pairs``. Bytes: none per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .common import (
    BLOCK_COLUMNS,
    H_DAMPING,
    H_EPS,
    H_PAIR_MOMENTUM,
    H_SIGMA_HIGH,
    H_SIGMA_LOW,
    PROGRAM_COLUMNS,
    SUM_ROWS,
    Launcher,
    group_status,
    is_finite,
    lerp,
    padded,
    pair_candidate,
    sum_rows,
)


@triton.jit
def damping_factor(s_dot_y, s_dot_s, sigma_low, sigma_high, damping, eps):
    """phi of section 2 step 7; a port of :func:`mlbfgs_fused._two_loop.damping_factor`."""
    mu = s_dot_y / (s_dot_s + eps)
    low = (1 - sigma_low) / tl.where(mu < sigma_low, 1 - mu, 1.0)
    high = (sigma_high - 1) / tl.where(mu > sigma_high, mu - 1, 1.0)
    phi = tl.where(mu < sigma_low, low, tl.where(mu > sigma_high, high, 1.0))
    return tl.minimum(phi, 1 - damping)


@triton.jit
def pair_decision(pair_partials_ptr, prog_lo, prog_hi, hyper_ptr, ROWS: tl.constexpr):
    """``(phi, accepted)`` of the block's candidate pair, from pass 2's partial sums."""
    j = tl.arange(0, 4)
    sums = sum_rows(pair_partials_ptr, 3, j, j < 3, prog_lo, prog_hi, ROWS)
    ss = tl.sum(tl.where(j == 0, sums, 0.0), axis=0)
    sy = tl.sum(tl.where(j == 1, sums, 0.0), axis=0)
    eps = tl.load(hyper_ptr + H_EPS)
    phi = damping_factor(
        sy, ss, tl.load(hyper_ptr + H_SIGMA_LOW), tl.load(hyper_ptr + H_SIGMA_HIGH),
        tl.load(hyper_ptr + H_DAMPING), eps,
    )
    s_dot_yhat = phi * sy + (1 - phi) * ss
    return phi, is_finite(s_dot_yhat) & (s_dot_yhat > eps)


@triton.jit
def push_kernel(
    param_ema_ptr, grad_ema_ptr, param_snap_ptr, grad_snap_ptr, hist_s_ptr, hist_y_ptr,
    programs_ptr, blocks_ptr, stats_ptr, n_group_blocks, pair_partials_ptr, gram_partials_ptr,
    hyper_ptr, step_ptr, pair_count_ptr, period,
    M: tl.constexpr, F64: tl.constexpr, TILE: tl.constexpr,
    ROWS: tl.constexpr, NCOL: tl.constexpr, BCOL: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32  # arithmetic type of the arena
    finite, _d_dot_d, _any_held = group_status(stats_ptr, n_group_blocks, ROWS)
    pid = tl.program_id(0).to(tl.int64)
    row = programs_ptr + pid * NCOL
    start, end, b = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    t = tl.load(step_ptr + b).to(tl.int64) + 1
    if (finite == 0) | (t % period != 0):
        return  # no pair due: nothing per element

    ring_origin, ring_stride = tl.load(row + 4), tl.load(row + 5)
    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    count = (end - start).to(tl.int32)
    inside = lane < count
    P = tl.load(param_ema_ptr + start + lane, mask=inside, other=0.0)
    G = tl.load(grad_ema_ptr + start + lane, mask=inside, other=0.0)
    if t > period:  # snapshots exist: a pair forms
        prog_lo = tl.load(blocks_ptr + b * BCOL + 2)
        prog_hi = tl.load(blocks_ptr + b * BCOL + 3)
        phi, accepted = pair_decision(pair_partials_ptr, prog_lo, prog_hi, hyper_ptr, ROWS)
        if accepted:
            pair_count = tl.load(pair_count_ptr + b)
            newest = ring_origin + ((pair_count - 1 + M) % M) * ring_stride + start
            r = tl.where(pair_count > 0, tl.load(hyper_ptr + H_PAIR_MOMENTUM), 0.0).to(CDT)
            s, y = pair_candidate(
                P.to(CDT),
                tl.load(param_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
                G.to(CDT),
                tl.load(grad_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
                tl.load(hist_s_ptr + newest + lane, mask=inside, other=0.0).to(CDT),
                tl.load(hist_y_ptr + newest + lane, mask=inside, other=0.0).to(CDT),
                r,
            )
            slot = pair_count % M
            s_row = s.to(hist_s_ptr.dtype.element_ty)
            yhat_row = lerp(s, y, phi.to(CDT)).to(hist_y_ptr.dtype.element_ty)
            ring = ring_origin + slot * ring_stride + start
            tl.store(hist_s_ptr + ring + lane, s_row, mask=inside)
            tl.store(hist_y_ptr + ring + lane, yhat_row, mask=inside)
            # Inner products of the rows as stored with every row of the ring.
            s = s_row.to(CDT)
            yhat = yhat_row.to(CDT)
            out = gram_partials_ptr + pid * 4 * M
            for j in range(M):
                ring_j = ring_origin + j * ring_stride + start
                other = lane < tl.where(j == slot, 0, count)  # the slot itself: the new rows
                s_j = tl.load(hist_s_ptr + ring_j + lane, mask=other, other=0.0).to(CDT)
                y_j = tl.load(hist_y_ptr + ring_j + lane, mask=other, other=0.0).to(CDT)
                s_j = tl.where(j == slot, s, s_j)
                y_j = tl.where(j == slot, yhat, y_j)
                tl.store(out + j, tl.sum(s_j * s, axis=0).to(tl.float64))  # S S^T [slot, j]
                tl.store(out + M + j, tl.sum(s_j * yhat, axis=0).to(tl.float64))  # S Y^T [j, slot]
                tl.store(out + 2 * M + j, tl.sum(y_j * s, axis=0).to(tl.float64))  # S Y^T [slot, j]
                tl.store(out + 3 * M + j, tl.sum(y_j * yhat, axis=0).to(tl.float64))  # Y Y^T [slot, j]
    tl.store(param_snap_ptr + start + lane, P, mask=inside)
    tl.store(grad_snap_ptr + start + lane, G, mask=inside)


@triton.jit
def commit_kernel(
    blocks_ptr, stats_ptr, n_group_blocks, pair_partials_ptr, gram_partials_ptr, hyper_ptr,
    gram_ptr, step_ptr, pair_count_ptr, skipped_pairs_ptr, skipped_steps_ptr, period,
    M: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr, BCOL: tl.constexpr,
):
    finite, _d_dot_d, _any_held = group_status(stats_ptr, n_group_blocks, ROWS)
    b = tl.program_id(0).to(tl.int64)
    ok = finite.to(tl.int64)
    t = tl.load(step_ptr + b).to(tl.int64) + ok
    tl.store(step_ptr + b, t.to(step_ptr.dtype.element_ty))
    tl.store(skipped_steps_ptr + b, tl.load(skipped_steps_ptr + b) + (1 - ok))
    if (finite == 0) | (t % period != 0) | (t <= period):
        return  # no pair formed

    prog_lo = tl.load(blocks_ptr + b * BCOL + 2)
    prog_hi = tl.load(blocks_ptr + b * BCOL + 3)
    _phi, accepted = pair_decision(pair_partials_ptr, prog_lo, prog_hi, hyper_ptr, ROWS)
    pair_count = tl.load(pair_count_ptr + b)
    if accepted:
        slot = pair_count % M
        j = tl.arange(0, MP)
        valid = j < M
        width = 4 * M
        ss_row = sum_rows(gram_partials_ptr, width, j, valid, prog_lo, prog_hi, ROWS)
        sy_col = sum_rows(gram_partials_ptr, width, M + j, valid, prog_lo, prog_hi, ROWS)
        ys_row = sum_rows(gram_partials_ptr, width, 2 * M + j, valid, prog_lo, prog_hi, ROWS)
        yy_row = sum_rows(gram_partials_ptr, width, 3 * M + j, valid, prog_lo, prog_hi, ROWS)
        gram = gram_ptr + b * 3 * M * M
        mm = M * M
        tl.store(gram + slot * M + j, ss_row, mask=valid)
        tl.store(gram + j * M + slot, ss_row, mask=valid)
        tl.store(gram + mm + slot * M + j, ys_row, mask=valid)  # [slot, j] = s . y_j
        tl.store(gram + mm + j * M + slot, sy_col, mask=valid)  # [j, slot] = s_j . yhat
        tl.store(gram + 2 * mm + slot * M + j, yy_row, mask=valid)
        tl.store(gram + 2 * mm + j * M + slot, yy_row, mask=valid)
    tl.store(pair_count_ptr + b, pair_count + accepted.to(tl.int64))
    tl.store(skipped_pairs_ptr + b, tl.load(skipped_pairs_ptr + b) + (1 - accepted.to(tl.int64)))


def _push(
    param_ema: Tensor, grad_ema: Tensor, param_snap: Tensor, grad_snap: Tensor,
    hist_s: Tensor, hist_y: Tensor, programs: Tensor, blocks: Tensor, stats: Tensor,
    pair_partials: Tensor, gram_partials: Tensor, hyper: Tensor, step: Tensor,
    pair_count: Tensor, period: int, m: int, tile: int,
) -> None:
    wrap_triton(push_kernel)[(programs.shape[0],)](
        param_ema, grad_ema, param_snap, grad_snap, hist_s, hist_y, programs, blocks, stats,
        stats.shape[0], pair_partials, gram_partials, hyper, step, pair_count, period,
        M=m, F64=param_ema.dtype == torch.float64, TILE=tile, ROWS=SUM_ROWS,
        NCOL=PROGRAM_COLUMNS, BCOL=BLOCK_COLUMNS,
    )


def _commit(
    blocks: Tensor, stats: Tensor, pair_partials: Tensor, gram_partials: Tensor, hyper: Tensor,
    gram: Tensor, step: Tensor, pair_count: Tensor, skipped_pairs: Tensor,
    skipped_steps: Tensor, period: int, m: int,
) -> None:
    wrap_triton(commit_kernel)[(blocks.shape[0],)](
        blocks, stats, stats.shape[0], pair_partials, gram_partials, hyper, gram, step,
        pair_count, skipped_pairs, skipped_steps, period,
        M=m, MP=padded(m), ROWS=SUM_ROWS, BCOL=BLOCK_COLUMNS,
    )


push = Launcher(
    "push", _push, push_kernel,
    ("param_snap", "grad_snap", "hist_s", "hist_y", "gram_partials"),
)
commit = Launcher(
    "commit", _commit, commit_kernel,
    ("gram", "step", "pair_count", "skipped_pairs", "skipped_steps"),
)
