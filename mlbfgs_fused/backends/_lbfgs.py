"""What LBFGS's plans share on every backend: the layouts of the per-piece partial sums,
the model scratch and the read vector (twins of ``csrc/lbfgs.h`` and ``kernels/lbfgs_common.py``),
and the plan's common state (docs/design.md, "LBFGS").

An LBFGS iteration, per arena, is the passes of :class:`~mlbfgs_fused.backends.LBFGSPlan`:

``gradient_dots``
    after each closure evaluation: the gradient ``g``'s dots with the ring and, when a
    pair candidate exists (``s = alpha d``, the step just taken; ``y = g - prev_grad``,
    both as the ring would store them), the candidate's dots with the ring and with
    itself; ``g.g``, ``g.d``, ``|g|_1``, ``max |g|``. Per piece (chunk, tile, or the
    whole arena for foreach), one row of ``partial_width(m)`` float64 columns.
``two_loop``
    on the first arena's device: the rows summed (fixed order), the pair's acceptance
    (``s.y > 1e-10``, finite), the candidate Gram matrices (the state's with the
    pair's row and column), the coefficients of ``d = -H g`` over ``[g, S, Y]``
    (the vector-free two-loop, ``csrc/ops.h`` ``two_loop_block``), ``g.d`` of that
    ``d`` from the dots alone, and the read vector. Nothing of the state changes: the
    evaluation may not become an iterate (the line search goes on, or the loop stops).
``push``
    the accepted pair into its ring slot, the candidate Gram matrices and pair count
    into the state. The fused plans do it inside ``direction``, which reads ``s`` and
    ``y`` anyway.
``direction``
    ``d = c_g g + S^T c_s + Y^T c_y``, ``prev_grad = g``; optionally the parameters
    saved and moved to the first trial point ``x + move d``; ``max |d|`` per arena
    (read with the next evaluation).
``move``
    a trial point: ``x = saved + alpha d`` (or ``x += alpha d``).
``keep``
    the gradient of the current point copied aside (the line search may return it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._state.lbfgs_arena import LBFGSArena

# Where a pass reads the gradient from: the user's ``.grad`` (negated under maximize),
# or a flat buffer of the arena that already holds the effective gradient.
SOURCE_GRAD, SOURCE_KEPT, SOURCE_PREV = 0, 1, 2

# The read vector: one float64 row on the first arena's device, read once per evaluation.
READ_LOSS, READ_GTD, READ_GTD_NEXT, READ_GMAX, READ_GL1, READ_GG, READ_FIXED = range(7)
# READ_FIXED + a: max |d| over arena a's last direction.

# A pair is stored only when s.y exceeds this (torch.optim.LBFGS's rule).
CURVATURE_MIN = 1e-10

# Partial sums per piece: [R_G, R_S, R_Y] (2m each: the dots of g, s, y with the ring
# rows s_0 .. s_{m-1}, y_0 .. y_{m-1}), then the scalars below.
SCALARS = ("gg", "gd", "ss", "sy", "yy", "sg", "yg", "gl1", "gmax", "dmax")
NUM_SCALARS = len(SCALARS)
(P_GG, P_GD, P_SS, P_SY, P_YY, P_SG, P_YG, P_GL1, P_GMAX, P_DMAX) = range(NUM_SCALARS)


def partial_width(m: int) -> int:
    return 6 * m + NUM_SCALARS


def scalar_column(m: int, index: int) -> int:
    return 6 * m + index


# The model scratch: the candidate Gram matrices [3, m, m], then these, then 3m doubles
# of two-loop scratch.
MODEL_ACCEPT, MODEL_SLOT, MODEL_COUNT, MODEL_FIXED = range(4)


def model_size(m: int) -> int:
    return 3 * m * m + MODEL_FIXED + 3 * m


class LBFGSPlanBase:
    """The state every LBFGS plan holds: its arenas, the model tensors (the optimizer's
    ``gram`` and ``pair_count``), the read vector, the model scratch, the coefficients,
    and the line search's buffers (the saved point and a kept gradient), all made once.

    ``scales[a]`` is arena ``a``'s share of the step (its group's ``lr`` over the first
    group's), set by the optimizer each step."""

    def __init__(self, arenas: list[LBFGSArena], gram: Tensor, pair_count: Tensor, maximize: bool,
                 line_search: bool):
        self.arenas = arenas
        self.m = arenas[0].m
        self.home = gram.device
        self.gram, self.pair_count, self.maximize = gram, pair_count, maximize
        f64 = dict(dtype=torch.float64, device=self.home)
        self.read = torch.zeros(READ_FIXED + len(arenas), **f64)
        self.model = torch.zeros(model_size(self.m), **f64)
        self.coef = torch.zeros(2 * self.m + 1, **f64)
        self.scales = [1.0] * len(arenas)
        self.line_search = line_search
        self.saved = [torch.zeros_like(a.direction) for a in arenas] if line_search else None
        self.kept = [torch.zeros_like(a.direction) for a in arenas] if line_search else None
        self.saved_views = [self._views(a, x) for a, x in zip(arenas, self.saved)] if line_search else None
        self.kept_views = [self._views(a, x) for a, x in zip(arenas, self.kept)] if line_search else None

    @staticmethod
    def _views(arena: LBFGSArena, flat: Tensor) -> list[Tensor]:
        return [arena.param_view(flat, i) for i in range(len(arena.params))]

    def keep(self) -> None:
        """``kept = g`` per arena, from the user's gradients (zero where there is none)."""
        for arena, kept, views in zip(self.arenas, self.kept, self.kept_views):
            present = [(v, g) for v, g in zip(views, arena.local_grads()) if g is not None]
            if len(present) < len(views):
                kept.zero_()
            if present:
                torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
            if self.maximize:
                kept.neg_()
