"""What the fused plans (Triton, C++, CUDA C++) share: the pieces an arena is cut into,
the group's devices and status rows, and the learning rate as a device scalar.

A fused pass walks an arena in pieces that each lie inside one block and one
parameter (Triton's tiles, the C++ chunks; docs/design.md, "The fused backend" and
"The C++ and CUDA backends"); every block's ring is an ``[m, n_b]`` matrix at
``m * lo``, so element ``x`` of the arena sits in row ``i`` at
``ring_origin + i * ring_stride + x`` with ``ring_origin = m * lo - lo`` and
``ring_stride = n_b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._state.arena import Arena

STATS_COLUMNS = 3  # per block of the group: g.g, ||d||^2, any pair held (csrc/ops.h StatsColumn)


def pieces(layout, size: int) -> list[tuple[int, int, int, int]]:
    """``(start, end, block, param)`` of every piece of at most ``size`` elements, each
    inside one block and one parameter (arena order), block by block."""
    offsets = list(layout.param_offsets)
    ends = offsets[1:] + [layout.numel]
    out = []
    for b in range(layout.num_blocks):
        lo, hi = layout.block_bounds[b], layout.block_bounds[b + 1]
        for i, (p_lo, p_hi) in enumerate(zip(offsets, ends)):
            a, z = max(lo, p_lo), min(hi, p_hi)
            for start in range(a, z, size):
                out.append((start, min(start + size, z), b, i))
    return out


def ring_geometry(layout, b: int, m: int) -> tuple[int, int]:
    """``(ring_origin, ring_stride)`` of block ``b`` (see the module docstring)."""
    lo, hi = layout.block_bounds[b], layout.block_bounds[b + 1]
    return m * lo - lo, hi - lo


class GroupGeometry:
    """A group's arenas seen together: its devices, where each arena's blocks sit among
    the group's, and the group-wide status rows (one copy per device), from which each
    device finds the group's scale of ``d`` (``csrc/ops.h`` / ``kernels/two_loop.py``
    direction_scale)."""

    def __init__(self, arenas: list[Arena]):
        self.devices = list(dict.fromkeys(a.device for a in arenas))
        self.block_offsets = []
        total = 0
        for arena in arenas:
            self.block_offsets.append(total)
            total += arena.layout.num_blocks
        self.num_blocks = total
        self.stats = {
            d: torch.zeros(total, STATS_COLUMNS, dtype=torch.float64, device=d) for d in self.devices
        }
        # What the kernels find the group's scale of d from: the status rows, or where the
        # group's blocks lie on several ranks (distributed "blockwise") one row holding
        # the group's ||d||^2 and pair count, completed by Arena.group_sum.
        self.partial_group = any(a.partial_group for a in arenas)
        self.scale_rows = self.stats
        if self.partial_group:
            self.totals = torch.zeros(2, dtype=torch.float64, device=self.devices[0])
            self.scale_rows = {
                d: torch.zeros(1, STATS_COLUMNS, dtype=torch.float64, device=d) for d in self.devices
            }

    def share_stats(self, arenas: list[Arena]) -> None:
        """A group spread over devices: each device gets every arena's status rows."""
        if len(self.devices) < 2:
            return
        for arena, offset in zip(arenas, self.block_offsets):
            rows = slice(offset, offset + arena.layout.num_blocks)
            for d in self.devices:
                if d != arena.device:
                    self.stats[d][rows].copy_(self.stats[arena.device][rows], non_blocking=True)

    def complete_group(self, arenas: list[Arena]) -> None:
        """Distributed ``"blockwise"``: the group's ``||d||^2`` and count of blocks holding
        a pair, summed over this rank's blocks and completed over the ranks by one
        ``group_sum`` of two float64 (after :meth:`share_stats`)."""
        home = self.devices[0]
        torch.sum(self.stats[home][:, 1:], dim=0, out=self.totals)  # S_DD, S_HELD
        arenas[0].group_sum(self.totals)
        for d in self.devices:
            self.scale_rows[d][0, 1:].copy_(self.totals, non_blocking=True)


def identity_blocks(layout, device) -> Tensor:
    """A block table (``lo, hi, first, end``, as csrc/ops.h and kernels/common.py lay it
    out) whose block ``b`` covers row ``b`` alone: how the kernels that add a block's
    partial rows read per-block sums that are already complete."""
    rows = [(layout.block_bounds[b], layout.block_bounds[b + 1], b, b + 1) for b in range(layout.num_blocks)]
    return torch.tensor(rows, dtype=torch.int64).view(-1, 4).to(device)


class LearningRate:
    """The group's ``lr`` as a 1-element tensor per device, what the kernels read: a
    tensor ``lr`` on that device as it is (a scheduler's updates are seen without a
    copy; of dtype ``dtype`` where the kernels need that one), anything else through a
    float64 buffer filled when a float changes or copied each step from a tensor
    elsewhere (from the CPU by value, which a CUDA graph cannot capture: an error
    then). One element, not 0-dim: under ``torch.compile`` (torch 2.13) a ``fill_`` of
    a 0-dim float64 CPU tensor that the graph then reads is lost."""

    def __init__(self, devices: list[torch.device], dtype: torch.dtype | None = None):
        self.dtype = dtype
        self.buffers = {d: torch.zeros(1, dtype=torch.float64, device=d) for d in devices}
        self.source: float | Tensor | None = None  # what the views below were made for
        self.on: dict[torch.device, Tensor] = {}

    def refresh(self, lr: float | Tensor) -> dict[torch.device, Tensor]:
        if not isinstance(lr, Tensor):
            if isinstance(self.source, Tensor) or lr != self.source:  # a fill only when it changes
                for buffer in self.buffers.values():
                    buffer.fill_(lr)
                self.on, self.source = dict(self.buffers), lr
            return self.on
        if lr is not self.source:  # a new lr tensor: views are made once, not per step
            self.on = {
                d: lr.view(1) if lr.device == d and self.dtype in (None, lr.dtype) else buffer
                for d, buffer in self.buffers.items()
            }
            self.source = lr
        for d, buffer in self.buffers.items():
            if self.on[d] is not buffer:
                continue
            if lr.device.type != "cpu" or d.type == "cpu":
                buffer.copy_(lr.view(1), non_blocking=True)
            elif torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "MLBFGS (fused): a CPU tensor lr cannot be read during CUDA graph "
                    "capture; put lr on the parameters' device (capturable=True)"
                )
            else:
                buffer.fill_(lr.item())
        return self.on
