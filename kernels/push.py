"""The pair push (DESIGN.md section 2 step 7) and the step's counters.

Launched every step. Each program first learns, on the device, whether the step
was finite (from the stats rows) and whether a pair is due (``t % T == 0`` with
the step counter of the coefficient kernel's record); when none is due it
returns at once. The first program of each block keeps the block's counters:
``step += finite``, ``skipped_steps += not finite`` every step and, on a
pair-forming step, ``pair_count``/``skipped_pairs`` and the Gram matrices. The
other programs read only the record, so these writes race with nothing.

On a due step, per block: the sums of pass 2's partials (in a fixed order, the
same in every program) give ``s.s``, ``s.y``, ``y.y``, hence the damping factor
``phi``, ``s.yhat = phi s.y + (1 - phi) s.s`` and the acceptance test. Each
program then recomputes its tile of ``s`` and ``yhat = lerp(s, y, phi)`` from the
EMAs, snapshots and newest pair, writes them into ring slot ``pair_count % m``
when the pair is accepted, and rolls the snapshots (``P0 = P``, ``G0 = G``). The
new Gram row and column follow from pass 2's per-slot sums and ``phi`` without
another pass over the history.

Launches: one per arena, one program per tile.
Bytes per element on a due step: reads ``4 E`` (P, P0, G, G0) ``+ 2 H`` (newest
pair); writes ``2 H`` (the ring slot) ``+ 2 E`` (snapshots). float32: ``40 N``
every ``T`` steps; nothing per element otherwise.
"""

from __future__ import annotations

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
    compute_dtype,
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
def push_kernel(
    param_ema_ptr, grad_ema_ptr, param_snap_ptr, grad_snap_ptr, hist_s_ptr, hist_y_ptr,
    programs_ptr, blocks_ptr, record_ptr, stats_ptr, n_group_blocks, push_partials_ptr, hyper_ptr,
    gram_ptr, step_ptr, pair_count_ptr, skipped_pairs_ptr, skipped_steps_ptr, period,
    M: tl.constexpr, MP: tl.constexpr, CDT: tl.constexpr, TILE: tl.constexpr,
    ROWS: tl.constexpr, NCOL: tl.constexpr, BCOL: tl.constexpr,
):
    finite, _d_dot_d, _any_held = group_status(stats_ptr, n_group_blocks, ROWS)
    pid = tl.program_id(0).to(tl.int64)
    row = programs_ptr + pid * NCOL
    start, end, b = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    ring_origin, ring_stride = tl.load(row + 4), tl.load(row + 5)
    prog_lo = tl.load(blocks_ptr + b * BCOL + 2)
    prog_hi = tl.load(blocks_ptr + b * BCOL + 3)
    lead = pid == prog_lo
    step, pair_count = tl.load(record_ptr + b * 2), tl.load(record_ptr + b * 2 + 1)
    t = step + finite.to(tl.int64)
    if lead:
        tl.store(step_ptr + b, t.to(step_ptr.dtype.element_ty))
        tl.store(skipped_steps_ptr + b, tl.load(skipped_steps_ptr + b) + (1 - finite.to(tl.int64)))
    if (finite == 0) | (t % period != 0):
        return  # no pair due: nothing per element

    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    count = (end - start).to(tl.int32)
    inside = lane < count
    P = tl.load(param_ema_ptr + start + lane, mask=inside, other=0.0)
    G = tl.load(grad_ema_ptr + start + lane, mask=inside, other=0.0)
    if t > period:  # snapshots exist: a pair forms
        width = 3 + 4 * M
        j = tl.arange(0, 4)
        sums = sum_rows(push_partials_ptr, width, j, j < 3, prog_lo, prog_hi, ROWS)
        ss = tl.sum(tl.where(j == 0, sums, 0.0), axis=0)
        sy = tl.sum(tl.where(j == 1, sums, 0.0), axis=0)
        yy = tl.sum(tl.where(j == 2, sums, 0.0), axis=0)
        phi = damping_factor(
            sy, ss,
            tl.load(hyper_ptr + H_SIGMA_LOW), tl.load(hyper_ptr + H_SIGMA_HIGH),
            tl.load(hyper_ptr + H_DAMPING), tl.load(hyper_ptr + H_EPS),
        )
        s_dot_yhat = phi * sy + (1 - phi) * ss
        accept = is_finite(s_dot_yhat) & (s_dot_yhat > tl.load(hyper_ptr + H_EPS))
        slot = pair_count % M
        if accept:
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
            yhat = lerp(s, y, phi.to(CDT))
            ring = ring_origin + slot * ring_stride + start
            tl.store(hist_s_ptr + ring + lane, s.to(hist_s_ptr.dtype.element_ty), mask=inside)
            tl.store(hist_y_ptr + ring + lane, yhat.to(hist_y_ptr.dtype.element_ty), mask=inside)
        if lead:
            if accept:
                _write_gram_row(
                    gram_ptr + b * 3 * M * M, push_partials_ptr, width, prog_lo, prog_hi,
                    slot, phi, ss, sy, yy, s_dot_yhat, M, MP, ROWS,
                )
            tl.store(pair_count_ptr + b, pair_count + accept.to(tl.int64))
            tl.store(
                skipped_pairs_ptr + b,
                tl.load(skipped_pairs_ptr + b) + (1 - accept.to(tl.int64)),
            )
    tl.store(param_snap_ptr + start + lane, P, mask=inside)
    tl.store(grad_snap_ptr + start + lane, G, mask=inside)


@triton.jit
def _write_gram_row(
    gram, partials_ptr, width, prog_lo, prog_hi, slot, phi, ss, sy, yy, s_dot_yhat,
    M: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr,
):
    """Row and column ``slot`` of ``S S^T``, ``S Y^T``, ``Y Y^T`` for the new pair
    ``(s, yhat = phi y + (1 - phi) s)``, from the per-slot sums against the old rows."""
    j = tl.arange(0, MP)
    valid = j < M
    Ss = sum_rows(partials_ptr, width, 3 + j, valid, prog_lo, prog_hi, ROWS)  # s_j . s
    Sy = sum_rows(partials_ptr, width, 3 + M + j, valid, prog_lo, prog_hi, ROWS)  # s_j . y
    Ys = sum_rows(partials_ptr, width, 3 + 2 * M + j, valid, prog_lo, prog_hi, ROWS)  # y_j . s
    Yy = sum_rows(partials_ptr, width, 3 + 3 * M + j, valid, prog_lo, prog_hi, ROWS)  # y_j . y
    own = j == slot  # the slot's old row is replaced by the new pair itself
    yhat_dot_yhat = phi * phi * yy + 2 * phi * (1 - phi) * sy + (1 - phi) * (1 - phi) * ss
    ss_row = tl.where(own, ss, Ss)
    sy_col = tl.where(own, s_dot_yhat, phi * Sy + (1 - phi) * Ss)  # [j, slot] = s_j . yhat
    ys_row = tl.where(own, s_dot_yhat, Ys)  # [slot, j] = s . y_j
    yy_row = tl.where(own, yhat_dot_yhat, phi * Yy + (1 - phi) * Ys)
    mm = M * M
    tl.store(gram + slot * M + j, ss_row, mask=valid)
    tl.store(gram + j * M + slot, ss_row, mask=valid)
    tl.store(gram + mm + slot * M + j, ys_row, mask=valid)
    tl.store(gram + mm + j * M + slot, sy_col, mask=valid)
    tl.store(gram + 2 * mm + slot * M + j, yy_row, mask=valid)
    tl.store(gram + 2 * mm + j * M + slot, yy_row, mask=valid)


def _push(
    param_ema: Tensor, grad_ema: Tensor, param_snap: Tensor, grad_snap: Tensor,
    hist_s: Tensor, hist_y: Tensor, programs: Tensor, blocks: Tensor, record: Tensor,
    stats: Tensor, push_partials: Tensor, hyper: Tensor, gram: Tensor, step: Tensor,
    pair_count: Tensor, skipped_pairs: Tensor, skipped_steps: Tensor,
    period: int, m: int, tile: int,
) -> None:
    wrap_triton(push_kernel)[(programs.shape[0],)](
        param_ema, grad_ema, param_snap, grad_snap, hist_s, hist_y, programs, blocks, record,
        stats, stats.shape[0], push_partials, hyper, gram, step, pair_count, skipped_pairs,
        skipped_steps, period,
        M=m, MP=padded(m), CDT=compute_dtype(param_ema.dtype), TILE=tile, ROWS=SUM_ROWS,
        NCOL=PROGRAM_COLUMNS, BCOL=BLOCK_COLUMNS,
    )


push = Launcher(
    "push",
    _push,
    push_kernel,
    ("param_snap", "grad_snap", "hist_s", "hist_y", "gram", "step", "pair_count",
     "skipped_pairs", "skipped_steps"),
)
