"""Pass 2: form the direction, update the averages and momentum, write the parameters.

Per element, with ``g`` recomputed as in pass 1 (docs/design.md, "The step", 3-6):
``d = scale * (c_g g + sum_i c_s[i] s_i + c_y[i] y_i)`` with ``scale = 1 / ||d||``
over the group by the rule of ``normalize`` (every step by default, else once it holds a
pair, or never); ``buf = momentum * buf + d``;
``theta -= lr * buf``; ``P``, ``G`` move toward ``theta`` (before the update) and
``g`` (weight 1 at the first step; ``variant="released"``: E1's averages, and E2's
``G = g`` on a step with ``t % T == 0``). Nothing is written unless the step's global
verdict ``ok`` holds, and the entries of a parameter without a gradient are left
alone. ``theta`` and ``grad`` are the user's tensors (the address table).

Launches: one per arena, one program per worker, looping over its tiles.
Bytes per element: reads ``5 E`` (grad, theta, P, G, buf) ``+ 2 m H``; writes ``4 E``
(theta, P, G, buf). float32: ``(8m + 36) N``. The group's scale of ``d`` is one
float64 each program reads (:func:`.two_loop.direction_scale_kernel`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    H_MOMENTUM,
    H_WEIGHT_DECAY,
    TILE_COLUMNS,
    WORKER_COLUMNS,
    Launcher,
    averages,
    effective_gradient,
    tile_geometry,
    traceable,
    user_tensor,
    worker_geometry,
)


@triton.jit
def update_kernel(
    addresses_ptr, tiles_ptr, workers_ptr, hist_s_ptr, hist_y_ptr,
    param_ema_ptr, grad_ema_ptr, buf_ptr, coef_ptr, step_ptr, d_scale_ptr,
    hyper_ptr, lr_ptr, scale_ptr, ok_ptr, period,
    M: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
    RELEASED: tl.constexpr, F64: tl.constexpr, TILE: tl.constexpr, ALIGNED: tl.constexpr,
    TCOL: tl.constexpr, WCOL: tl.constexpr,
):
    if tl.load(ok_ptr) == 0:
        return  # a skipped step changes nothing (the commit kernel counts it)
    CDT = tl.float64 if F64 else tl.float32  # arithmetic type of the arena
    DT = param_ema_ptr.dtype.element_ty  # the parameters' dtype

    w = tl.program_id(0).to(tl.int64)
    b, tile_lo, tile_hi, tile_step, ring_origin, ring_stride = worker_geometry(workers_ptr, w, WCOL, ALIGNED)
    t = tl.load(step_ptr + b) + 1
    first = t == 1

    # 1 / ||d|| over the group, found in float64 once per group (direction_scale_kernel).
    scale = tl.load(d_scale_ptr).to(CDT)
    momentum = tl.load(hyper_ptr + H_MOMENTUM).to(CDT)
    weight_decay = tl.load(hyper_ptr + H_WEIGHT_DECAY).to(CDT)
    neg_lr = -(tl.load(lr_ptr).to(CDT))
    grad_scale = tl.load(hyper_ptr).to(CDT)  # unused unless HAS_SCALE
    if HAS_SCALE:
        grad_scale = tl.load(scale_ptr).to(CDT)
    coef = coef_ptr + b * (2 * M + 1)
    c_g = tl.load(coef).to(CDT)

    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    for k in range(tile_lo, tile_hi, tile_step):
        start, count, param, local = tile_geometry(tiles_ptr, k, TCOL, ALIGNED)
        theta_base, _ = user_tensor(addresses_ptr, param, 0, DT, ALIGNED)
        grad_base, present = user_tensor(addresses_ptr, param, 1, DT, ALIGNED)
        live = lane < tl.where(present, count, 0)  # entries with a gradient
        theta = tl.load(theta_base + local + lane, mask=live, other=0.0).to(CDT)
        grad = tl.load(grad_base + local + lane, mask=live, other=0.0).to(CDT)
        g = effective_gradient(grad, theta, weight_decay, grad_scale, HAS_WD, MAXIMIZE, HAS_SCALE)
        g = tl.where(live, g, 0.0)
        P = tl.load(param_ema_ptr + start + lane, mask=live, other=0.0).to(CDT)
        G = tl.load(grad_ema_ptr + start + lane, mask=live, other=0.0).to(CDT)
        P, G = averages(P, G, theta, g, live, first, hyper_ptr, CDT, DT, RELEASED)
        if RELEASED:  # E2: G = g at a step with t % T == 0, after the push took G0
            G = tl.where(t % period == 0, g, G)
        # Written now, so they need no registers through the ring loop.
        tl.store(param_ema_ptr + start + lane, P.to(DT), mask=live)
        tl.store(grad_ema_ptr + start + lane, G.to(DT), mask=live)

        d = g * c_g
        for i in range(M):
            ring = ring_origin + i * ring_stride + start
            s_i = tl.load(hist_s_ptr + ring + lane, mask=live, other=0.0).to(CDT)
            y_i = tl.load(hist_y_ptr + ring + lane, mask=live, other=0.0).to(CDT)
            d = d + tl.load(coef + 1 + i).to(CDT) * s_i
            d = d + tl.load(coef + 1 + M + i).to(CDT) * y_i
        d = d * scale
        buf = tl.load(buf_ptr + start + lane, mask=live, other=0.0).to(CDT)
        buf = buf * momentum + d
        tl.store(theta_base + local + lane, (theta + buf * neg_lr).to(DT), mask=live)
        tl.store(buf_ptr + start + lane, buf.to(DT), mask=live)


def _update(
    addresses: Tensor, tiles: Tensor, workers: Tensor, hist_s: Tensor, hist_y: Tensor,
    param_ema: Tensor, grad_ema: Tensor, buf: Tensor, coef: Tensor, step: Tensor,
    d_scale: Tensor, hyper: Tensor, lr: Tensor, scale: Tensor, ok: Tensor, period: int,
    m: int, has_wd: bool, maximize: bool, has_scale: bool, released: bool,
    tile: int, aligned: bool,
) -> None:
    traceable(update_kernel)[(workers.shape[0],)](
        addresses, tiles, workers, hist_s, hist_y, param_ema, grad_ema, buf, coef, step,
        d_scale, hyper, lr, scale, ok, period,
        M=m, HAS_WD=has_wd, MAXIMIZE=maximize, HAS_SCALE=has_scale,
        RELEASED=released,
        F64=param_ema.dtype == torch.float64, TILE=tile, ALIGNED=aligned,
        TCOL=TILE_COLUMNS, WCOL=WORKER_COLUMNS,
    )


update = Launcher("update", _update, update_kernel, ("param_ema", "grad_ema", "buf"))
