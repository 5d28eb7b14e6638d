"""The coefficient kernel: the two-loop recursion on scalars, one program per block.

A port of :func:`mlbfgs_fused._math.two_loop_coefficients` (the
vector-free two-loop, Chen, Wang, Zhou 2014), in float64: from the block's Gram
matrices and the pass-1 sums it finds ``d = c_g g + sum_i (c_s[i] s_i + c_y[i] y_i)``
and ``||d||^2`` as a quadratic form of the Gram matrix of ``{g, s_i, y_i}``. With no
pair held it gives ``c_g = 1`` (the SGD warm-up). Unheld slots are masked, never
branched on.

Launches: one per arena, one program per block (``variant="released"``: two, the
decision and probe before the step's verdict, the coefficients after the pair push);
then :func:`direction_scale_kernel`, one program per group and device, turns the
group's stats rows into the scale of ``d`` that pass 2 reads (one load per program).
Bytes: none per element; per block it reads ``W_b (2m + 4)`` partial sums (``W_b <= cap`` workers, whatever
``N``) and the ``3 m^2`` Gram entries, and writes ``2m + 1`` coefficients and
5 scalars; program 0 also reads the ``g.g`` column of all ``W`` worker rows.

Outputs, per block ``b``:

* ``coef[b] = (c_g, c_s [m], c_y [m])`` in slot order (float64);
* ``stats[block_offset + b] = (g.g, ||d||^2, any pair held)`` in the group-wide
  matrix (see :mod:`.common`);
* ``decision[b] = (phi, accepted)`` of the candidate pair when one forms this step
  (docs/design.md, "The step", 7), decided here once for the whole block from
  pass 1's sums; ``(0, 0)`` otherwise;
* ``probe`` (program 0): ``g.g`` over the arena, in a fixed order: non-finite
  exactly when some effective gradient entry is (the optimizer's finiteness probe).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import (
    BLOCK_COLUMNS,
    DECISION_COLUMNS,
    H_DAMPING,
    H_EPS,
    H_SIGMA_HIGH,
    H_SIGMA_LOW,
    STATS_COLUMNS,
    SUM_ROWS,
    Launcher,
    group_status,
    is_finite,
    padded,
    sum_rows,
    traceable,
)


@triton.jit
def damping_factor(s_dot_y, s_dot_s, sigma_low, sigma_high, damping, eps):
    """phi of docs/design.md, "The step", 7; a port of :func:`mlbfgs_fused._math.damping_factor`."""
    mu = s_dot_y / (s_dot_s + eps)
    low = (1 - sigma_low) / tl.where(mu < sigma_low, 1 - mu, 1.0)
    high = (sigma_high - 1) / tl.where(mu > sigma_high, mu - 1, 1.0)
    phi = tl.where(mu < sigma_low, low, tl.where(mu > sigma_high, high, 1.0))
    return tl.minimum(phi, 1 - damping)


@triton.jit
def pair_decision(pair_partials_ptr, row_lo, row_hi, hyper_ptr, ROWS: tl.constexpr):
    """``(phi, accepted)`` of the block's candidate pair, from pass 1's partial sums."""
    j = tl.arange(0, 4)
    sums = sum_rows(pair_partials_ptr, 3, j, j < 3, row_lo, row_hi, ROWS)
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
def two_loop_kernel(
    partials_ptr, pair_partials_ptr, blocks_ptr, gram_ptr, step_ptr, pair_count_ptr, hyper_ptr,
    coef_ptr, stats_ptr, decision_ptr, probe_ptr, block_offset, n_workers, period,
    M: tl.constexpr, MP: tl.constexpr, ROWS: tl.constexpr, NCOL: tl.constexpr,
    DECIDE: tl.constexpr, COEF: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    prog_lo = tl.load(blocks_ptr + b * NCOL + 2)
    prog_hi = tl.load(blocks_ptr + b * NCOL + 3)
    pair_count = tl.load(pair_count_ptr + b)
    width = 2 * M + 1
    if DECIDE:
        if b == 0:  # the arena's finiteness probe: g.g over every worker row, fixed order
            k = tl.arange(0, 2)
            gg_all = sum_rows(partials_ptr, width, 2 * M + k, k < 1, 0, n_workers, ROWS)
            tl.store(probe_ptr, tl.sum(gg_all, axis=0))
        # The pair this step forms, if any: damping and acceptance, once per block.
        t = tl.load(step_ptr + b) + 1
        forms_pair = (t % period == 0) & (t > period)
        phi, accepted = pair_decision(pair_partials_ptr, prog_lo, prog_hi, hyper_ptr, ROWS)
        accepted = forms_pair & accepted
        decision = decision_ptr + b * DECISION_COLUMNS
        tl.store(decision, tl.where(accepted, phi, 0.0))
        tl.store(decision + 1, accepted.to(tl.float64))
    if not COEF:
        return

    # Everything stays in slot order; the k-th newest pair sits in slot
    # (pair_count - 1 - k) mod m, and k < min(pair_count, m) are held.
    j = tl.arange(0, MP)
    valid = j < M
    n_held = tl.minimum(pair_count, M)
    Sg = sum_rows(partials_ptr, width, j, valid, prog_lo, prog_hi, ROWS)
    Yg = sum_rows(partials_ptr, width, M + j, valid, prog_lo, prog_hi, ROWS)
    gg = tl.sum(sum_rows(partials_ptr, width, 2 * M + j, j < 1, prog_lo, prog_hi, ROWS), axis=0)

    gram = gram_ptr + b * 3 * M * M
    SS_ptr, SY_ptr, YY_ptr = gram, gram + M * M, gram + 2 * M * M  # SY[i, j] = s_i . y_j
    # rho_j = 1 / s_j.y_j for held slots, 0 elsewhere (the slot's age is (newest - j) mod m).
    age = (pair_count - 1 - j + M) % M  # kept non-negative: % truncates on the GPU
    held = valid & (age < n_held)
    sy_diag = tl.load(SY_ptr + j * M + j, mask=valid, other=1.0)
    rho = tl.where(held, 1.0 / tl.where(held, sy_diag, 1.0), 0.0)

    c_g = tl.full([], 1.0, tl.float64)
    c_s = tl.zeros([MP], dtype=tl.float64)
    c_y = tl.zeros([MP], dtype=tl.float64)
    alpha = tl.zeros([MP], dtype=tl.float64)

    # First loop, newest to oldest: alpha_k = rho_k s_k.q ; q -= alpha_k y_k.
    # Rows of the Gram matrices are read from memory; register entries are picked by mask.
    for k in range(M):
        slot = (pair_count - 1 - k + M) % M
        here = j == slot
        s_dot_q = (
            c_g * tl.sum(tl.where(here, Sg, 0.0), axis=0)
            + tl.sum(tl.load(SS_ptr + slot * M + j, mask=valid, other=0.0) * c_s, axis=0)
            + tl.sum(tl.load(SY_ptr + slot * M + j, mask=valid, other=0.0) * c_y, axis=0)
        )
        a = tl.sum(tl.where(here, rho, 0.0), axis=0) * s_dot_q
        alpha = tl.where(here, a, alpha)
        c_y = tl.where(here, c_y - a, c_y)

    # H0 = gamma I from the newest pair; 1 while the history is empty.
    any_held = n_held > 0
    newest = (pair_count - 1 + M) % M
    yy_newest = tl.where(any_held, tl.load(YY_ptr + newest * M + newest), 1.0)
    gamma = tl.where(any_held, tl.load(SY_ptr + newest * M + newest) / yy_newest, 1.0)
    c_g, c_s, c_y = gamma * c_g, gamma * c_s, gamma * c_y

    # Second loop, oldest to newest: beta = rho_k y_k.r ; r += (alpha_k - beta) s_k.
    for back in range(M):
        slot = (pair_count + back) % M  # the slot of k = M - 1 - back
        here = j == slot
        y_dot_r = (
            c_g * tl.sum(tl.where(here, Yg, 0.0), axis=0)
            + tl.sum(tl.load(SY_ptr + j * M + slot, mask=valid, other=0.0) * c_s, axis=0)
            + tl.sum(tl.load(YY_ptr + slot * M + j, mask=valid, other=0.0) * c_y, axis=0)
        )
        beta = tl.sum(tl.where(here, rho, 0.0), axis=0) * y_dot_r
        c_s = tl.where(here, c_s + (alpha - beta), c_s)

    # ||d||^2 as the quadratic form of the Gram matrix of {g, s_i, y_i}.
    square = j[:, None] * M + j[None, :]
    both = valid[:, None] & valid[None, :]
    SS = tl.load(SS_ptr + square, mask=both, other=0.0)
    SY = tl.load(SY_ptr + square, mask=both, other=0.0)
    YY = tl.load(YY_ptr + square, mask=both, other=0.0)
    d_dot_d = (
        c_g * c_g * gg
        + 2 * c_g * (tl.sum(c_s * Sg, axis=0) + tl.sum(c_y * Yg, axis=0))
        + tl.sum(c_s[:, None] * SS * c_s[None, :])
        + 2 * tl.sum(c_s[:, None] * SY * c_y[None, :])
        + tl.sum(c_y[:, None] * YY * c_y[None, :])
    )

    out = coef_ptr + b * width
    tl.store(out, c_g)
    tl.store(out + 1 + j, c_s, mask=valid)
    tl.store(out + 1 + M + j, c_y, mask=valid)
    stats = stats_ptr + (block_offset + b) * STATS_COLUMNS
    tl.store(stats, gg)
    tl.store(stats + 1, d_dot_d)
    tl.store(stats + 2, any_held.to(tl.float64))


@triton.jit
def direction_scale_kernel(stats_ptr, n_blocks, scale_ptr, NORMALIZE: tl.constexpr, ROWS: tl.constexpr):
    """``1 / ||d||`` over the whole group or 1, by the rule ``NORMALIZE`` names
    (mlbfgs_fused/_math.py, Note [direction scale]: 0 never, 1 once some block holds a
    pair, 2 always; 1 as well when ``||d|| = 0``): one program per group and device,
    from the stats rows of every block of the group, fixed order."""
    scale = tl.full([], 1.0, tl.float64)
    if NORMALIZE != 0:
        d_dot_d, any_held = group_status(stats_ptr, n_blocks, ROWS)
        norm = tl.sqrt(d_dot_d)
        due = norm > 0
        if NORMALIZE == 1:
            due = due & any_held
        scale = tl.where(due, 1.0 / tl.where(norm > 0, norm, 1.0), 1.0)
    tl.store(scale_ptr, scale)


def _direction_scale(stats: Tensor, scale: Tensor, normalize: int) -> None:
    traceable(direction_scale_kernel)[(1,)](
        stats, stats.shape[0], scale, NORMALIZE=normalize, ROWS=SUM_ROWS
    )


def _two_loop(
    partials: Tensor, pair_partials: Tensor, blocks: Tensor, gram: Tensor, step: Tensor,
    pair_count: Tensor, hyper: Tensor, coef: Tensor, stats: Tensor, decision: Tensor,
    probe: Tensor, block_offset: int, period: int, m: int, decide: bool, coefficients: bool,
) -> None:
    traceable(two_loop_kernel)[(blocks.shape[0],)](
        partials, pair_partials, blocks, gram, step, pair_count, hyper, coef, stats, decision,
        probe, block_offset, partials.shape[0], period,
        M=m, MP=padded(m), ROWS=SUM_ROWS, NCOL=BLOCK_COLUMNS, DECIDE=decide, COEF=coefficients,
    )


@triton.jit
def block_sums_kernel(partials_ptr, blocks_ptr, sums_ptr, width, WP: tl.constexpr, ROWS: tl.constexpr,
                      NCOL: tl.constexpr):
    """Per block, the sum of its workers' rows of a partial-sum matrix, in the order the
    other kernels add them (:func:`~.common.sum_rows`): what a rank holding part of each
    block (distributed ``"sharded"``) completes across ranks before the coefficient and
    commit kernels read it back through a block table with one row per block
    (docs/design.md, "Distributed"). One program per block."""
    b = tl.program_id(0).to(tl.int64)
    row_lo = tl.load(blocks_ptr + b * NCOL + 2)
    row_hi = tl.load(blocks_ptr + b * NCOL + 3)
    cols = tl.arange(0, WP)
    valid = cols < width
    total = sum_rows(partials_ptr, width, cols, valid, row_lo, row_hi, ROWS)
    tl.store(sums_ptr + b * width + cols, total, mask=valid)


def _block_sums(partials: Tensor, blocks: Tensor, sums: Tensor) -> None:
    width = sums.shape[1]
    traceable(block_sums_kernel)[(blocks.shape[0],)](
        partials, blocks, sums, width, WP=padded(width), ROWS=SUM_ROWS, NCOL=BLOCK_COLUMNS
    )


two_loop = Launcher(
    "two_loop", _two_loop, two_loop_kernel, ("coef", "stats", "decision", "probe")
)
block_sums = Launcher("block_sums", _block_sums, block_sums_kernel, ("sums",))
direction_scale = Launcher(
    "direction_scale", _direction_scale, direction_scale_kernel, ("scale",)
)
