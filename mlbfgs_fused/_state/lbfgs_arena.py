"""LBFGS's state on the arena machinery of :mod:`.arena` (docs/design.md, "State layout"
and "LBFGS").

``mlbfgs_fused.LBFGS`` keeps, per (group, device, dtype), one :class:`LBFGSArena`: the
parameters laid end to end as one block (``blocks="group"``), two per-element buffers
and the history ring, ``[m * N]`` each in ``history_dtype``, row ``i`` of the ring being
the ``[N]`` slice at ``i * N`` (the layout of an MLBFGS block). Per parameter ``p``
(views shaped like ``p``, in its memory order):

    ``direction`` (torch's ``d``: the last direction, unscaled) and ``prev_grad`` (the
    gradient the last direction was formed at; torch's ``prev_flat_grad``).

Per arena, in ``state[its first parameter]``: ``history_s`` and ``history_y`` (``[m, N]``
views in slot order, the keys and layout of an MLBFGS block starting in a parameter) and
``step_size`` (a float: the last step was ``step_size * direction``; torch's ``t`` times
the group's share of ``lr``).

The model that spans every arena (one quasi-Newton model over all parameters) is the
optimizer's, in ``state[first parameter]``: ``gram`` (``[3, m, m]`` float64, ``S S^T``,
``S Y^T`` with ``[i, j] = s_i . y_j``, ``Y Y^T`` in slot order: the convention of
docs/design.md, "Gram matrices", summed over the arenas) and ``pair_count`` (int64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .arena import Arena
from .layout import ArenaLayout

LBFGS_PARAM_KEYS = ("direction", "prev_grad")
LBFGS_BLOCK_KEYS = ("history_s", "history_y")


class LBFGSArena(Arena):
    """One (group, device, dtype) of LBFGS: per-element ``direction`` and ``prev_grad``
    and the history ring, one block. ``index``: the arena's place in the optimizer's
    arena order; ``group``: its parameter group."""

    PARAM_KEYS = LBFGS_PARAM_KEYS
    BLOCK_KEYS = LBFGS_BLOCK_KEYS

    def __init__(self, params: list[Tensor], layout: ArenaLayout, history_size: int,
                 history_dtype: torch.dtype | None, group: int, index: int):
        # Arena.__init__ would also make MLBFGS's per-block Gram matrices and counters;
        # LBFGS's model spans the arenas and lives with the optimizer.
        self.layout = layout
        self.params = [params[i] for i in layout.order]
        first = params[0]
        # Where step_size is kept: the arena's first parameter (a distributed rank's
        # slice may hold none of the arena's parameters; mlbfgs_fused/distributed/).
        self.anchor = first
        self.device, self.dtype = first.device, first.dtype
        self.history_dtype = history_dtype or first.dtype
        self.m = history_size
        self.group, self.index = group, index
        n, m = layout.numel, history_size
        self.flat_state = {key: torch.zeros(n, dtype=self.dtype, device=self.device) for key in LBFGS_PARAM_KEYS}
        self.history_s = torch.zeros(m * n, dtype=self.history_dtype, device=self.device)
        self.history_y = torch.zeros(m * n, dtype=self.history_dtype, device=self.device)

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def direction(self) -> Tensor:
        return self.flat_state["direction"]

    @property
    def prev_grad(self) -> Tensor:
        return self.flat_state["prev_grad"]

    def rings(self) -> tuple[Tensor, Tensor]:
        """The history as ``[m, N]`` matrices, row ``i`` = ring slot ``i``."""
        return self.history_view(self.history_s, 0), self.history_view(self.history_y, 0)

    def block_state(self, b: int) -> dict:
        return {"history_s": self.history_view(self.history_s, b), "history_y": self.history_view(self.history_y, b)}

    def owned_state(self, blocks: list[int]) -> dict:
        return self.block_state(blocks[0])  # one block: the arena

    def first_non_finite(self) -> str | None:
        buffers = {**self.flat_state, "history_s": self.history_s, "history_y": self.history_y}
        for name, buffer in buffers.items():
            if not bool(torch.isfinite(buffer).all()):
                return name
        return None
