"""Pass 1: the inner products of the gradient with the history, read-only.

Per block ``b`` (docs/design.md, "The step"): ``S_b g``, ``Y_b g`` (one entry per
ring slot) and ``g.g``, with ``g = grad / grad_scale + weight_decay * theta``
(negated under ``maximize``) and zero where a parameter has no gradient. On a step
that forms a curvature pair (``t % T == 0`` and ``t > T``) also the candidate's
``s.s``, ``s.y``, ``y.y`` (``s = P' - P0``, ``y = G' - G0`` after pair momentum,
with ``P'``, ``G'`` the averages this step will write): the coefficient kernel
decides the pair's damping and acceptance from them once per block, before the
update, so the push needs no block-wide sum of its own.

Launches: one per arena, one program per worker (a bounded number per block),
each looping over its tiles. Bytes per element (``E`` parameter bytes, ``H``
history bytes, ``m`` slots): reads ``E`` (grad) ``+ E`` (theta, only with weight
decay) ``+ 2 m H`` (S, Y); writes nothing per element, ``(2m + 4) * 8`` bytes of
partial sums per worker. float32, no weight decay: ``(8m + 4) N``. A pair-forming
step (every ``T`` steps) adds ``4 E + 2 H`` (P, G, P0, G0, the newest pair) and
``E`` (theta). Tiles of a parameter without a gradient read nothing.

Output: ``dot_partials[w] = (S g [m], Y g [m], g.g)`` and, when a pair forms,
``pair_partials[w] = (s.s, s.y, y.y)`` and ``g.g`` from float64 products (so no finite
entries overflow them); the ring dots are summed per tile in the arena's compute type
(float32 for 16-bit parameters), then in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (
    H_PAIR_MOMENTUM,
    H_WEIGHT_DECAY,
    TILE_COLUMNS,
    WORKER_COLUMNS,
    Launcher,
    averages,
    effective_gradient,
    padded,
    pair_candidate,
    tile_geometry,
    traceable,
    user_tensor,
    worker_geometry,
)


@triton.jit
def gradient_dots_kernel(
    addresses_ptr, tiles_ptr, workers_ptr, hist_s_ptr, hist_y_ptr,
    param_ema_ptr, grad_ema_ptr, param_snap_ptr, grad_snap_ptr, step_ptr, pair_count_ptr,
    hyper_ptr, scale_ptr, dot_partials_ptr, pair_partials_ptr, period,
    M: tl.constexpr, MP: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_SCALE: tl.constexpr, RELEASED: tl.constexpr, F64: tl.constexpr, TILE: tl.constexpr,
    ALIGNED: tl.constexpr, TCOL: tl.constexpr, WCOL: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32  # arithmetic type of the arena
    DT = param_ema_ptr.dtype.element_ty  # the parameters' dtype
    w = tl.program_id(0).to(tl.int64)
    b, tile_lo, tile_hi, tile_step, ring_origin, ring_stride = worker_geometry(workers_ptr, w, WCOL, ALIGNED)
    t = tl.load(step_ptr + b) + 1
    forms_pair = (t % period == 0) & (t > period)
    pair_count = tl.load(pair_count_ptr + b)
    newest = ring_origin + ((pair_count - 1 + M) % M) * ring_stride
    r = tl.where(pair_count > 0, tl.load(hyper_ptr + H_PAIR_MOMENTUM), 0.0).to(CDT)
    weight_decay = tl.load(hyper_ptr + H_WEIGHT_DECAY).to(CDT)
    grad_scale = tl.load(hyper_ptr).to(CDT)  # unused unless HAS_SCALE
    if HAS_SCALE:
        grad_scale = tl.load(scale_ptr).to(CDT)

    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    j = tl.arange(0, MP)
    acc_s = tl.zeros([MP], dtype=tl.float64)
    acc_y = tl.zeros([MP], dtype=tl.float64)
    acc_gg = tl.full([], 0.0, tl.float64)
    acc_ss = tl.full([], 0.0, tl.float64)
    acc_sy = tl.full([], 0.0, tl.float64)
    acc_yy = tl.full([], 0.0, tl.float64)
    for k in range(tile_lo, tile_hi, tile_step):
        start, count, param, local = tile_geometry(tiles_ptr, k, TCOL, ALIGNED)
        theta_base, _ = user_tensor(addresses_ptr, param, 0, DT, ALIGNED)
        grad_base, present = user_tensor(addresses_ptr, param, 1, DT, ALIGNED)
        n_live = tl.where(present, count, 0)
        live = lane < n_live  # masked loads: no traffic where there is no gradient
        grad = tl.load(grad_base + local + lane, mask=live, other=0.0).to(CDT)
        if HAS_WD:
            theta = tl.load(theta_base + local + lane, mask=live, other=0.0).to(CDT)
        else:  # only a pair-forming step needs theta
            n_theta = tl.where(forms_pair, n_live, 0)
            theta = tl.load(theta_base + local + lane, mask=lane < n_theta, other=0.0).to(CDT)
        g = effective_gradient(grad, theta, weight_decay, grad_scale, HAS_WD, MAXIMIZE, HAS_SCALE)
        g = tl.where(live, g, 0.0)
        for i in range(M):
            ring = ring_origin + i * ring_stride + start
            s = tl.load(hist_s_ptr + ring + lane, mask=live, other=0.0).to(CDT)
            y = tl.load(hist_y_ptr + ring + lane, mask=live, other=0.0).to(CDT)
            acc_s += tl.where(j == i, tl.sum(s * g, axis=0).to(tl.float64), 0.0)
            acc_y += tl.where(j == i, tl.sum(y * g, axis=0).to(tl.float64), 0.0)
        g64 = g.to(tl.float64)
        acc_gg += tl.sum(g64 * g64, axis=0)
        if forms_pair:
            # The averages as the update will write them, then the candidate pair.
            inside = lane < count
            P = tl.load(param_ema_ptr + start + lane, mask=inside, other=0.0).to(CDT)
            G = tl.load(grad_ema_ptr + start + lane, mask=inside, other=0.0).to(CDT)
            P, G = averages(P, G, theta, g, live, t == 1, hyper_ptr, CDT, DT, RELEASED)
            s, y = pair_candidate(
                P,
                tl.load(param_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
                G,
                tl.load(grad_snap_ptr + start + lane, mask=inside, other=0.0).to(CDT),
                tl.load(hist_s_ptr + newest + start + lane, mask=inside, other=0.0).to(CDT),
                tl.load(hist_y_ptr + newest + start + lane, mask=inside, other=0.0).to(CDT),
                r,
            )
            s, y = s.to(tl.float64), y.to(tl.float64)  # float64 products: no overflow on finite data
            acc_ss += tl.sum(s * s, axis=0)
            acc_sy += tl.sum(s * y, axis=0)
            acc_yy += tl.sum(y * y, axis=0)

    out = dot_partials_ptr + w * (2 * M + 1)
    tl.store(out + j, acc_s, mask=j < M)
    tl.store(out + M + j, acc_y, mask=j < M)
    tl.store(out + 2 * M, acc_gg)
    if forms_pair:
        pair = pair_partials_ptr + w * 3
        tl.store(pair, acc_ss)
        tl.store(pair + 1, acc_sy)
        tl.store(pair + 2, acc_yy)


def _gradient_dots(
    addresses: Tensor, tiles: Tensor, workers: Tensor, hist_s: Tensor, hist_y: Tensor,
    param_ema: Tensor, grad_ema: Tensor, param_snap: Tensor, grad_snap: Tensor, step: Tensor,
    pair_count: Tensor, hyper: Tensor, scale: Tensor, dot_partials: Tensor, pair_partials: Tensor,
    period: int, m: int, has_wd: bool, maximize: bool, has_scale: bool, released: bool,
    tile: int, aligned: bool,
) -> None:
    traceable(gradient_dots_kernel)[(workers.shape[0],)](
        addresses, tiles, workers, hist_s, hist_y, param_ema, grad_ema, param_snap, grad_snap,
        step, pair_count, hyper, scale, dot_partials, pair_partials, period,
        M=m, MP=padded(m), HAS_WD=has_wd, MAXIMIZE=maximize, HAS_SCALE=has_scale,
        RELEASED=released, F64=param_ema.dtype == torch.float64, TILE=tile, ALIGNED=aligned,
        TCOL=TILE_COLUMNS, WCOL=WORKER_COLUMNS,
    )


gradient_dots = Launcher(
    "gradient_dots", _gradient_dots, gradient_dots_kernel, ("dot_partials", "pair_partials")
)
