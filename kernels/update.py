"""Pass 2: form the direction, update the EMAs and momentum, write the parameters.

Per element, with ``g`` recomputed as in pass 1 (DESIGN.md section 2 steps 3-6):
``d = scale * (c_g g + sum_i c_s[i] s_i + c_y[i] y_i)`` with ``scale = 1 / ||d||``
over the group once it holds a pair (``normalize``); ``buf = momentum * buf + d``;
``theta -= lr * buf``; ``P``, ``G`` move toward ``theta`` (before the update) and
``g`` (weight 1 at the first step). Every write of the pass is skipped when the
group's gradient is not finite (each program finds that from the stats rows), and
the entries of a parameter without a gradient are left alone.

On a step that forms a curvature pair (``t % T == 0`` and ``t > T``) the pass also
writes, per program, the candidate's ``s.s``, ``s.y``, ``y.y`` (``s = P - P0``,
``y = G - G0`` after pair momentum, over the whole block, gradient or not): the
push kernel's damping factor needs these block-wide sums before it writes the pair.

Launches: one per arena, one program per tile.
Bytes per element: reads ``5 E`` (grad, theta, P, G, buf) ``+ 2 m H``; writes ``4 E``
(theta, P, G, buf). float32: ``(8m + 36) N``. A pair-forming step adds ``2 E + 2 H``
(the snapshots and the newest pair, for pair momentum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .common import (
    H_MOMENTUM,
    H_PAIR_MOMENTUM,
    H_W_GRAD,
    H_W_PARAM,
    H_WEIGHT_DECAY,
    PROGRAM_COLUMNS,
    SUM_ROWS,
    Launcher,
    effective_gradient,
    group_status,
    lerp,
    pair_candidate,
)


@triton.jit
def update_kernel(
    grad_ptr, param_ptr, hist_s_ptr, hist_y_ptr,
    param_ema_ptr, grad_ema_ptr, buf_ptr, param_snap_ptr, grad_snap_ptr,
    programs_ptr, present_ptr, coef_ptr, step_ptr, pair_count_ptr, stats_ptr, n_group_blocks,
    hyper_ptr, lr_ptr, pair_partials_ptr, period,
    M: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, NORMALIZE: tl.constexpr,
    F64: tl.constexpr, TILE: tl.constexpr, ROWS: tl.constexpr, NCOL: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32  # arithmetic type of the arena
    finite, d_dot_d, any_held = group_status(stats_ptr, n_group_blocks, ROWS)
    if finite == 0:
        return  # a non-finite step changes nothing (the commit kernel counts it)

    pid = tl.program_id(0).to(tl.int64)
    row = programs_ptr + pid * NCOL
    start, end, b = tl.load(row), tl.load(row + 1), tl.load(row + 2)
    present = tl.load(present_ptr + tl.load(row + 3)) != 0
    ring_origin, ring_stride = tl.load(row + 4), tl.load(row + 5)
    step = tl.load(step_ptr + b).to(tl.int64)
    pair_count = tl.load(pair_count_ptr + b)
    first = step == 0
    t = step + 1
    forms_pair = (t % period == 0) & (t > period)

    # 1 / ||d|| over the group in float64, as the foreach backend does, then narrowed.
    scale = tl.full([], 1.0, tl.float64)
    if NORMALIZE:
        norm = tl.sqrt(d_dot_d)
        scale = tl.where(any_held & (norm > 0), 1.0 / tl.where(norm > 0, norm, 1.0), 1.0)
    scale = scale.to(CDT)
    momentum = tl.load(hyper_ptr + H_MOMENTUM).to(CDT)
    weight_decay = tl.load(hyper_ptr + H_WEIGHT_DECAY).to(CDT)
    w_param = tl.where(first, 1.0, tl.load(hyper_ptr + H_W_PARAM)).to(CDT)
    w_grad = tl.where(first, 1.0, tl.load(hyper_ptr + H_W_GRAD)).to(CDT)
    neg_lr = -(tl.load(lr_ptr).to(CDT))

    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    count = (end - start).to(tl.int32)
    inside = lane < count
    live = lane < tl.where(present, count, 0)  # entries with a gradient
    theta = tl.load(param_ptr + start + lane, mask=inside, other=0.0).to(CDT)
    grad = tl.load(grad_ptr + start + lane, mask=live, other=0.0).to(CDT)
    g = tl.where(live, effective_gradient(grad, theta, weight_decay, HAS_WD, MAXIMIZE), 0.0)
    P = tl.load(param_ema_ptr + start + lane, mask=inside, other=0.0).to(CDT)
    G = tl.load(grad_ema_ptr + start + lane, mask=inside, other=0.0).to(CDT)
    P = tl.where(live, lerp(P, theta, w_param), P)
    G = tl.where(live, lerp(G, g, w_grad), G)
    # Written now, so they need no registers through the ring loop.
    tl.store(param_ema_ptr + start + lane, P.to(param_ema_ptr.dtype.element_ty), mask=live)
    tl.store(grad_ema_ptr + start + lane, G.to(grad_ema_ptr.dtype.element_ty), mask=live)

    # Where a pair forms: the candidate's s.s, s.y, y.y, for the push kernel's damping
    # (over the whole block, gradient or not).
    if forms_pair:
        newest = ring_origin + ((pair_count - 1 + M) % M) * ring_stride + start
        r = tl.where(pair_count > 0, tl.load(hyper_ptr + H_PAIR_MOMENTUM), 0.0).to(CDT)
        s, y = pair_candidate(
            P,
            tl.load(param_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
            G,
            tl.load(grad_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
            tl.load(hist_s_ptr + newest + lane, mask=inside, other=0.0).to(CDT),
            tl.load(hist_y_ptr + newest + lane, mask=inside, other=0.0).to(CDT),
            r,
        )
        partials = pair_partials_ptr + pid * 3
        tl.store(partials, tl.sum(s * s, axis=0).to(tl.float64))
        tl.store(partials + 1, tl.sum(s * y, axis=0).to(tl.float64))
        tl.store(partials + 2, tl.sum(y * y, axis=0).to(tl.float64))

    coef = coef_ptr + b * (2 * M + 1)
    d = g * tl.load(coef).to(CDT)
    for i in range(M):
        ring = ring_origin + i * ring_stride + start
        s_i = tl.load(hist_s_ptr + ring + lane, mask=live, other=0.0).to(CDT)
        y_i = tl.load(hist_y_ptr + ring + lane, mask=live, other=0.0).to(CDT)
        d = d + tl.load(coef + 1 + i).to(CDT) * s_i
        d = d + tl.load(coef + 1 + M + i).to(CDT) * y_i

    d = d * scale
    buf = tl.load(buf_ptr + start + lane, mask=live, other=0.0).to(CDT)
    buf = buf * momentum + d
    theta = theta + buf * neg_lr
    tl.store(param_ptr + start + lane, theta.to(param_ptr.dtype.element_ty), mask=live)
    tl.store(buf_ptr + start + lane, buf.to(buf_ptr.dtype.element_ty), mask=live)


def _update(
    grad: Tensor, param: Tensor, hist_s: Tensor, hist_y: Tensor,
    param_ema: Tensor, grad_ema: Tensor, buf: Tensor, param_snap: Tensor, grad_snap: Tensor,
    programs: Tensor, present: Tensor, coef: Tensor, step: Tensor, pair_count: Tensor,
    stats: Tensor, hyper: Tensor, lr: Tensor, pair_partials: Tensor,
    period: int, m: int, has_wd: bool, maximize: bool, normalize: bool, tile: int,
) -> None:
    wrap_triton(update_kernel)[(programs.shape[0],)](
        grad, param, hist_s, hist_y, param_ema, grad_ema, buf, param_snap, grad_snap,
        programs, present, coef, step, pair_count, stats, stats.shape[0], hyper, lr, pair_partials,
        period,
        M=m, HAS_WD=has_wd, MAXIMIZE=maximize, NORMALIZE=normalize,
        F64=param.dtype == torch.float64, TILE=tile, ROWS=SUM_ROWS, NCOL=PROGRAM_COLUMNS,
    )


update = Launcher(
    "update", _update, update_kernel, ("param", "param_ema", "grad_ema", "buf", "pair_partials")
)
