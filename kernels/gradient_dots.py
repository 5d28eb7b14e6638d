"""Pass 1: the inner products of the gradient with the history, read-only.

Per block ``b`` (DESIGN.md section 3): ``S_b g``, ``Y_b g`` (one entry per ring
slot) and ``g.g``, with ``g = grad + weight_decay * theta`` (negated under
``maximize``) and zero where a parameter has no gradient.

Launches: one per arena, one program per tile of the program table.
Bytes per element (``E`` parameter bytes, ``H`` history bytes, ``m`` slots):
reads ``E`` (grad) ``+ E`` (theta, only with weight decay) ``+ 2 m H`` (S, Y);
writes nothing per element, ``(2m + 1) * 8`` bytes of partial sums per program.
float32, no weight decay: ``(8m + 4) N``. Tiles of a parameter without a
gradient read nothing and write zero partials.

Output: ``partials[program] = (S g [m], Y g [m], g.g)`` in float64, slot order;
the coefficient kernel adds them per block in a fixed order. Products are summed
in the arena's compute type, ``g.g`` in float64 (its finiteness is the step's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .common import H_WEIGHT_DECAY, PROGRAM_COLUMNS, Launcher, effective_gradient


@triton.jit
def gradient_dots_kernel(
    grad_ptr, param_ptr, hist_s_ptr, hist_y_ptr, programs_ptr, present_ptr, hyper_ptr,
    partials_ptr,
    M: tl.constexpr, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr,
    F64: tl.constexpr, TILE: tl.constexpr, NCOL: tl.constexpr,
):
    CDT = tl.float64 if F64 else tl.float32  # arithmetic type of the arena
    pid = tl.program_id(0).to(tl.int64)
    row = programs_ptr + pid * NCOL
    start, end = tl.load(row), tl.load(row + 1)
    present = tl.load(present_ptr + tl.load(row + 3)) != 0
    ring_origin, ring_stride = tl.load(row + 4), tl.load(row + 5)

    lane = tl.arange(0, TILE)  # int32 lanes off 64-bit scalar bases: cheap addressing
    count = (end - start).to(tl.int32)
    # Masked loads: no traffic where there is no gradient.
    live = lane < tl.where(present, count, 0)
    grad = tl.load(grad_ptr + start + lane, mask=live, other=0.0).to(CDT)
    theta = grad  # only read with weight decay
    if HAS_WD:
        theta = tl.load(param_ptr + start + lane, mask=live, other=0.0).to(CDT)
    weight_decay = tl.load(hyper_ptr + H_WEIGHT_DECAY).to(CDT)
    g = tl.where(live, effective_gradient(grad, theta, weight_decay, HAS_WD, MAXIMIZE), 0.0)

    out = partials_ptr + pid * (2 * M + 1)
    for i in range(M):
        ring = ring_origin + i * ring_stride + start
        s = tl.load(hist_s_ptr + ring + lane, mask=live, other=0.0).to(CDT)
        y = tl.load(hist_y_ptr + ring + lane, mask=live, other=0.0).to(CDT)
        tl.store(out + i, tl.sum(s * g, axis=0).to(tl.float64))
        tl.store(out + M + i, tl.sum(y * g, axis=0).to(tl.float64))
    g64 = g.to(tl.float64)
    tl.store(out + 2 * M, tl.sum(g64 * g64, axis=0))


def _gradient_dots(
    grad: Tensor, param: Tensor, hist_s: Tensor, hist_y: Tensor, programs: Tensor,
    present: Tensor, hyper: Tensor, partials: Tensor,
    m: int, has_wd: bool, maximize: bool, tile: int,
) -> None:
    wrap_triton(gradient_dots_kernel)[(programs.shape[0],)](
        grad, param, hist_s, hist_y, programs, present, hyper, partials,
        M=m, HAS_WD=has_wd, MAXIMIZE=maximize, F64=param.dtype == torch.float64, TILE=tile,
        NCOL=PROGRAM_COLUMNS,
    )


gradient_dots = Launcher("gradient_dots", _gradient_dots, gradient_dots_kernel, ("partials",))
