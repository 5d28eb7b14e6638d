"""Helpers shared by the Triton kernels of the fused backend, and how they are launched.

Geometry (docs/design.md, "The fused backend"). The optimizer's own per-element
state lives in flat arenas (one ``[N]`` buffer per quantity, the parameters laid
end to end in their memory order); the parameters and gradients are the user's
own tensors, reached through an address table. The host builds four int64 tables
once per arena and uploads the address table again only when a ``data_ptr`` changes:

* address table ``[count, 2]``: the ``data_ptr`` of each parameter (arena order)
  and of its gradient, 0 where the parameter has no gradient this step;
* tile table ``[T, TILE_COLUMNS]``: ``start, end`` (arena range of at most ``TILE``
  elements, inside one block and one parameter), ``param`` (arena order) and
  ``local`` (where the tile starts inside that parameter's memory);
* worker table ``[W, WORKER_COLUMNS]``: ``block``, the tiles ``first, end, stride``
  it visits and the block's ring geometry ``ring_origin, ring_stride`` (row ``i``
  of the block's ring holds element ``x`` at ``ring_origin + i * ring_stride + x``);
* block table ``[B, BLOCK_COLUMNS]``: ``lo, hi`` and its workers ``first, end``.

A per-element kernel runs one program per worker; a worker loops over the tiles of
its block with a stride. A block gets at most ``cap`` workers (a few per SM, so the
grid is bounded by the machine, not by ``N``): ``W <= cap + B``.

Reductions are two-stage and deterministic: each worker writes one row of float64
partial sums, and a per-block program adds that block's rows in a fixed order
(:func:`sum_rows`), at most ``cap`` rows whatever ``N`` is.

Group status. The coefficient kernel writes, per block, ``(g.g, d.d, any pair
held)`` into a group-wide float64 ``[B_group, 3]`` matrix; one program per group and
device sums its last two columns (:func:`group_status`) into the scale of ``d`` that
pass 2 reads. The step's finiteness is not read from it: every kernel that writes
reads the step's global verdict ``ok`` (a bool on the arena's device) instead, and
the optimizer forms ``ok`` from each arena's probe (``g.g`` over the arena).

Hyperparameters live in a float64 device vector (indices ``H_*``), so changing
one needs no recompilation and a captured CUDA graph reads the current values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE_COLUMNS = 4
WORKER_COLUMNS = 6
BLOCK_COLUMNS = 4
# Constants the kernels read are tl.constexpr (plain globals are not visible in @jit code).
STATS_COLUMNS = tl.constexpr(3)  # g.g, d.d, held
DECISION_COLUMNS = tl.constexpr(2)  # phi, accepted: the block's pair, decided once

# Indices into the hyperparameter vector.
NUM_HYPER = 12
(
    H_LR, H_MOMENTUM, H_WEIGHT_DECAY, H_W_PARAM, H_W_GRAD,  # W_*: 1 - beta
    H_PAIR_MOMENTUM, H_DAMPING, H_SIGMA_LOW, H_SIGMA_HIGH, H_EPS,
    H_BETA_PARAM, H_BETA_GRAD,  # beta itself, for variant="released"
) = (tl.constexpr(i) for i in range(NUM_HYPER))

SUM_ROWS = 16  # rows per iteration of the fixed-order partial sums
# An arena whose tiles and rings all start at multiples of ALIGN elements, with the
# user's tensors at 16-byte aligned addresses, runs the ALIGNED specialization: the
# compiler is told so (tl.multiple_of) and emits vector loads and stores.
ALIGN = 16


def padded(m: int) -> int:
    """Vector length for ``m`` ring slots (a power of two, at least 2)."""
    return max(2, triton.next_power_of_2(m))


# -- device helpers -------------------------------------------------------------
@triton.jit
def lerp(a, b, w):
    """``torch.lerp``'s formula, so results agree with the foreach backend."""
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """``x`` rounded to a storage dtype; a 16-bit one through float32, as torch and the C++
    kernels round float64 to it (and as Triton converts)."""
    if DTYPE.primitive_bitwidth < 32:
        x = x.to(tl.float32)
    return x.to(DTYPE)


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
    """``(||d||^2, any pair held)`` of the whole group from the stats rows."""
    idx = tl.arange(0, 4)
    total = sum_rows(stats_ptr, STATS_COLUMNS, idx, (idx >= 1) & (idx < STATS_COLUMNS), 0, n_blocks, ROWS)
    d_dot_d = tl.sum(tl.where(idx == 1, total, 0.0), axis=0)
    held = tl.sum(tl.where(idx == 2, total, 0.0), axis=0)
    return d_dot_d, held > 0


@triton.jit
def user_tensor(addresses_ptr, param, which, element_ty, ALIGNED: tl.constexpr):
    """Pointer to the first element of parameter ``param``'s tensor (``which = 0``)
    or of its gradient (``which = 1``; null when it has none)."""
    address = tl.load(addresses_ptr + param * 2 + which)
    pointer = address.to(tl.pointer_type(element_ty))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer, address != 0


@triton.jit
def worker_geometry(workers_ptr, w, WCOL: tl.constexpr, ALIGNED: tl.constexpr):
    """Worker ``w``'s block, the tiles it visits and its block's ring geometry."""
    worker = workers_ptr + w * WCOL
    b = tl.load(worker)
    tile_lo, tile_hi, tile_step = tl.load(worker + 1), tl.load(worker + 2), tl.load(worker + 3)
    ring_origin, ring_stride = tl.load(worker + 4), tl.load(worker + 5)
    if ALIGNED:
        ring_origin = tl.multiple_of(ring_origin, 16)
        ring_stride = tl.multiple_of(ring_stride, 16)
    return b, tile_lo, tile_hi, tile_step, ring_origin, ring_stride


@triton.jit
def tile_geometry(tiles_ptr, k, TCOL: tl.constexpr, ALIGNED: tl.constexpr):
    """Tile ``k``: arena start, element count, parameter, start inside the parameter."""
    tile = tiles_ptr + k * TCOL
    start, end = tl.load(tile), tl.load(tile + 1)
    param, local = tl.load(tile + 2), tl.load(tile + 3)
    count = (end - start).to(tl.int32)
    if ALIGNED:
        start = tl.multiple_of(start, 16)
        local = tl.multiple_of(local, 16)
        count = tl.multiple_of(count, 16)
    return start, count, param, local


@triton.jit
def effective_gradient(grad, theta, weight_decay, grad_scale,
                       HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr):
    """``g = grad / grad_scale`` (``-grad / grad_scale`` under ``maximize``) ``+ weight_decay * theta``:
    torch's order, so weight decay pulls toward zero when maximising too (docs/design.md,
    "The step", 1; ``grad_scale`` is AMP's, when the gradients still carry it)."""
    g = grad
    if HAS_SCALE:
        g = g / grad_scale
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + weight_decay * theta
    return g


@triton.jit
def averages(P, G, theta, g, live, first, hyper_ptr, CDT: tl.constexpr, DT: tl.constexpr, RELEASED: tl.constexpr):
    """The averages after this step (docs/design.md, "The step", 6): ``P`` toward
    ``theta`` (before the update), ``G`` toward ``g``, where a gradient exists; at the
    first step ``P = theta``, ``G = g``. ``RELEASED`` (E1): ``P = beta_p P + theta``,
    ``G = beta_g G + g``, without the ``(1 - beta)`` factor.

    Rounded to ``DT``, the dtype they are stored in: every kernel that forms a pair
    candidate from them must see the values the push will read back (with 16-bit
    parameters an unrounded ``s`` could pass the curvature test while the stored
    one is 0)."""
    if RELEASED:
        a_p = tl.where(first, 0.0, tl.load(hyper_ptr + H_BETA_PARAM)).to(CDT)
        a_g = tl.where(first, 0.0, tl.load(hyper_ptr + H_BETA_GRAD)).to(CDT)
        P_new = a_p * P + theta
        G_new = a_g * G + g
    else:
        w_p = tl.where(first, 1.0, tl.load(hyper_ptr + H_W_PARAM)).to(CDT)
        w_g = tl.where(first, 1.0, tl.load(hyper_ptr + H_W_GRAD)).to(CDT)
        P_new = lerp(P, theta, w_p)
        G_new = lerp(G, g, w_g)
    P_new = P_new.to(DT).to(CDT)
    G_new = G_new.to(DT).to(CDT)
    return tl.where(live, P_new, P), tl.where(live, G_new, G)


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
    The user's parameters are written through the address table, which the op's
    schema cannot name; every launch is ordered after the last one, so they are
    written in program order all the same.
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


def traceable(kernel):
    """``torch.library.wrap_triton(kernel)``: what a ``triton_op`` launches so that
    ``torch.compile`` sees the kernel. The interpreter's kernels are launched as they
    are: they never trace (their op is opaque), and torch before 2.13 refuses to wrap them."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def _no_op(*args) -> None:
    return None


def _direct_launch():
    """Make ``wrap_triton`` hand back the bare kernel (what ``triton_op`` itself
    does for eager calls), skipping the higher-order-op dispatch."""
    from torch._library.triton import set_wrap_triton_enabled

    return set_wrap_triton_enabled(False)
