"""What LBFGS's Triton kernels share: the column layout of the partial sums, the model
scratch and the read vector (twins of ``csrc/lbfgs.h`` and
``mlbfgs_fused/backends/_lbfgs.py``), and device helpers. The geometry (tiles, workers,
the address table) is :mod:`.common`'s; an LBFGS arena is one block.

Launches per arena: :mod:`.lbfgs_gradient_dots` after each closure evaluation, then one
:mod:`.lbfgs_two_loop` program for all arenas; :mod:`.lbfgs_direction` once per iteration
(the pair's push, the direction, the saved point and the first trial step), and its
``lbfgs_move`` for later line-search trials. Step lengths live in a float64 device
vector (``steps[a] = (alpha, move)``), written by fills, so a float64 step is not
rounded to a float32 kernel argument.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import to_storage, user_tensor

# Scalars after the 6m ring columns of a partial row (csrc/lbfgs.h Scalar).
NUM_SCALARS = tl.constexpr(10)
P_GG, P_GD, P_SS, P_SY, P_YY, P_SG, P_YG, P_GL1, P_GMAX, P_DMAX = (tl.constexpr(i) for i in range(10))
# The read vector (csrc/lbfgs.h Read); READ_FIXED + a: max |d| of arena a.
READ_LOSS, READ_GTD, READ_GTD_NEXT, READ_GMAX, READ_GL1, READ_GG, READ_FIXED = (tl.constexpr(i) for i in range(7))
# After the candidate Gram matrices in the model scratch (csrc/lbfgs.h Model).
MODEL_ACCEPT, MODEL_SLOT, MODEL_COUNT, MODEL_FIXED = (tl.constexpr(i) for i in range(4))
CURVATURE_MIN = tl.constexpr(1e-10)
STEP_COLUMNS = 2  # steps[a]: alpha (s = alpha d), move (x += move d)


@triton.jit
def as_stored(x, HDT: tl.constexpr, CDT: tl.constexpr):
    """``x`` as the ring stores it (rounded to the history dtype), in the arithmetic type."""
    return to_storage(x, HDT).to(CDT)


@triton.jit
def gradient_tile(addresses_ptr, source_ptr, param, local, start, lane, count, DT: tl.constexpr,
                  CDT: tl.constexpr, HAS_SOURCE: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """The tile's gradient: a flat buffer of the arena (already the effective gradient),
    or the user's ``.grad`` (negated under ``maximize``; zero where there is none)."""
    if HAS_SOURCE:
        g = tl.load(source_ptr + start + lane, mask=lane < count, other=0.0).to(CDT)
    else:
        grad_base, present = user_tensor(addresses_ptr, param, 1, DT, ALIGNED)
        live = lane < tl.where(present, count, 0)
        g = tl.load(grad_base + local + lane, mask=live, other=0.0).to(CDT)
        if MAXIMIZE:
            g = -g
    return g


def padded_width(m: int) -> int:
    """Columns of a partial row, padded to a power of two."""
    return triton.next_power_of_2(6 * m + 10)
