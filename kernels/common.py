"""Helpers shared by the Triton kernels of the fused backend, and how they are launched.

Geometry. An arena of ``N`` elements is cut into *programs* (tiles) that each lie
in one block and one parameter, so a program has one block's ring and one
"has a gradient" flag. The host builds two int64 tables once per arena:

* program table ``[P, PROGRAM_COLUMNS]``: ``start, end`` (element range),
  ``block``, ``param`` (arena order), ``ring_origin``, ``ring_stride``; row ``i``
  of the block's ring holds element ``x`` at ``ring_origin + i * ring_stride + x``
  (the history is block-major: block ``b`` is an ``[m, n_b]`` matrix at ``m * lo``);
* block table ``[B, BLOCK_COLUMNS]``: ``lo, hi`` and the programs ``first, end``
  that cover it (every block has at least one program, possibly empty).

Reductions are two-stage: each program writes its partial sums to a row of a
float64 scratch matrix, and a consumer adds the rows of a block in a fixed order
(:func:`sum_rows`), so results do not depend on scheduling.

Group status. The coefficient kernel writes, per block, ``(g.g, d.d, any pair
held)`` into a group-wide float64 ``[B_group, 3]`` matrix; later kernels sum it
(:func:`group_status`) to learn whether the step is finite and the norm of ``d``
over the whole group, with no host round trip.

Hyperparameters live in a float64 device vector (indices ``H_*``), so changing
one needs no recompilation and a captured CUDA graph reads the current values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PROGRAM_COLUMNS = 6
BLOCK_COLUMNS = 4
# Constants the kernels read are tl.constexpr (plain globals are not visible in @jit code).
STATS_COLUMNS = tl.constexpr(3)  # g.g, d.d, held

# Indices into the hyperparameter vector.
NUM_HYPER = 10
(
    H_LR, H_MOMENTUM, H_WEIGHT_DECAY, H_W_PARAM, H_W_GRAD,  # W_*: 1 - beta
    H_PAIR_MOMENTUM, H_DAMPING, H_SIGMA_LOW, H_SIGMA_HIGH, H_EPS,
) = (tl.constexpr(i) for i in range(NUM_HYPER))

SUM_ROWS = 16  # rows per iteration of the fixed-order partial sums


def padded(m: int) -> int:
    """Vector length for ``m`` ring slots (a power of two, at least 2)."""
    return max(2, triton.next_power_of_2(m))


# -- device helpers -------------------------------------------------------------
@triton.jit
def lerp(a, b, w):
    """``torch.lerp``'s formula, so results agree with the foreach backend."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def is_finite(x):
    return (x == x) & (tl.abs(x) != float("inf"))


@triton.jit
def sum_rows(ptr, stride, cols, col_mask, row_lo, row_hi, ROWS: tl.constexpr):
    """Sum of rows ``[row_lo, row_hi)`` of a row-major float64 matrix at columns
    ``cols``, in a fixed order (chunks of ``ROWS`` rows, in sequence)."""
    rows = tl.arange(0, ROWS)
    acc = tl.zeros(cols.shape, dtype=tl.float64)
    for r0 in range(row_lo, row_hi, ROWS):
        r = r0 + rows
        mask = (r[:, None] < row_hi) & col_mask[None, :]
        rows_block = tl.load(ptr + r[:, None] * stride + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(rows_block, axis=0)
    return acc


@triton.jit
def group_status(stats_ptr, n_blocks, ROWS: tl.constexpr):
    """``(finite, ||d||^2, any pair held)`` of the whole group from the stats rows.

    ``g.g`` is accumulated in float64 from squares of finite values, so its sum is
    finite exactly when every gradient entry of the group is."""
    idx = tl.arange(0, 4)
    total = sum_rows(stats_ptr, STATS_COLUMNS, idx, idx < STATS_COLUMNS, 0, n_blocks, ROWS)
    gg = tl.sum(tl.where(idx == 0, total, 0.0), axis=0)
    d_dot_d = tl.sum(tl.where(idx == 1, total, 0.0), axis=0)
    held = tl.sum(tl.where(idx == 2, total, 0.0), axis=0)
    return is_finite(gg), d_dot_d, held > 0


@triton.jit
def effective_gradient(grad, theta, weight_decay, HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr):
    """``g = grad + weight_decay * theta``, negated under ``maximize`` (section 2 step 1)."""
    g = grad
    if HAS_WD:
        g = g + weight_decay * theta
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def pair_candidate(P, P0, G, G0, s_last, y_last, r):
    """``s = P - P0``, ``y = G - G0``, then pair momentum toward the newest pair
    (``r = 0`` when the block holds none: ``lerp`` with weight 0 is exact)."""
    s = lerp(P - P0, s_last, r)
    y = lerp(G - G0, y_last, r)
    return s, y


# -- launching ------------------------------------------------------------------
class Launcher:
    """One kernel launch, registered as the custom op ``mlbfgs_fused::<name>``.

    Under ``torch.compile`` the op is called, so the launch sequence traces into one
    graph: a ``torch.library.triton_op`` (Inductor sees the Triton kernel). With
    ``TRITON_INTERPRET=1`` the kernels are Python functions that cannot be traced,
    so the op is an opaque ``custom_op`` with a no-op fake instead. In eager mode the
    launch function runs directly: the dispatcher costs tens of microseconds a call.
    """

    def __init__(self, name: str, fn, kernel, mutates_args: tuple[str, ...]):
        from triton.runtime.interpreter import InterpretedFunction

        self.fn = fn
        qualname = f"mlbfgs_fused::{name}"
        if isinstance(kernel, InterpretedFunction):
            self.op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
            self.op.register_fake(_no_op)
        else:
            self.op = torch.library.triton_op(qualname, fn, mutates_args=mutates_args)

    def __call__(self, *args) -> None:
        if torch.compiler.is_compiling():
            self.op(*args)
            return
        with _direct_launch():
            self.fn(*args)


def _no_op(*args) -> None:
    return None


def _direct_launch():
    """Make ``wrap_triton`` hand back the bare kernel (what ``triton_op`` itself
    does for eager calls), skipping the higher-order-op dispatch."""
    from torch._library.triton import set_wrap_triton_enabled

    return set_wrap_triton_enabled(False)
