"""Which elements of an arena each rank owns: pure layout arithmetic, no communication.

An arena lays its parameters end to end in one flat vector of ``N`` elements
(:mod:`mlbfgs_fused._state.layout`). Under ``distributed=...`` every rank keeps the
state of a part of that vector only, given as sorted, disjoint ranges ``[lo, hi)``:

- ``"sharded"``: rank ``r`` owns the contiguous slice ``[r c, (r + 1) c)``,
  ``c = ceil(N / W)`` (the last slices may be shorter or empty). Every block is cut
  by the slices, so every rank keeps every block, most of them empty or partial.
- ``"blockwise"``: whole blocks are dealt to ranks, greedily by size (largest first,
  to the least loaded rank; ties to the rank nearest ``first_rank``): every rank keeps
  the blocks it owns and none of the others.

A rank's local vector is its owned elements in global order. It is described by a
:class:`ShardLayout`, an :class:`ArenaLayout` whose "parameters" are *pieces*: the
part ``[start, stop)`` (in memory order) of one parameter that lies in an owned
range. A parameter has at most one piece per owned range, and all its pieces sit
next to each other in the local vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._state.layout import ArenaLayout


@dataclass(frozen=True)
class ShardLayout(ArenaLayout):
    """A rank's part of an arena. ``order[i]`` names the parameter of piece ``i``,
    ``param_offsets[i]`` where the piece starts in the local vector, ``pieces[i]``
    the range ``[start, stop)`` of the parameter it holds. ``blocks[b]`` is the
    global index of local block ``b``; ``ranges`` the owned ranges of the global vector."""

    pieces: tuple[tuple[int, int], ...]
    blocks: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    def piece_numel(self, i: int) -> int:
        start, stop = self.pieces[i]
        return stop - start


def shard_ranges(numel: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous slice of each rank under ``"sharded"``."""
    chunk = max(1, math.ceil(numel / world_size))
    return [(min(r * chunk, numel), min((r + 1) * chunk, numel)) for r in range(world_size)]


def assign_blocks(sizes: list[int], world_size: int, first_rank: int = 0) -> list[int]:
    """The owner of each block under ``"blockwise"``: greedy by size, deterministic."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for b in sorted(range(len(sizes)), key=lambda b: (-sizes[b], b)):
        r = min(range(world_size), key=lambda r: (load[r], (r - first_rank) % world_size))
        owner[b] = r
        load[r] += sizes[b]
    return owner


def shard_layouts(layout: ArenaLayout, numels: list[int], mode: str, world_size: int,
                  first_rank: int = 0) -> list[ShardLayout]:
    """Every rank's :class:`ShardLayout` of ``layout`` (``numels`` in the order the
    layout was built from), so each rank also knows where its peers' elements go."""
    bounds = layout.block_bounds
    if mode == "sharded":
        ranges = [[r] for r in shard_ranges(layout.numel, world_size)]
        owned_blocks = [list(range(layout.num_blocks))] * world_size
    elif mode == "blockwise":
        owner = assign_blocks(layout.block_sizes(), world_size, first_rank)
        owned_blocks = [[b for b in range(layout.num_blocks) if owner[b] == r] for r in range(world_size)]
        ranges = [_merge([(bounds[b], bounds[b + 1]) for b in blocks]) for blocks in owned_blocks]
    else:
        raise ValueError(f"unknown distributed mode {mode!r}")
    return [_local(layout, numels, ranges[r], owned_blocks[r]) for r in range(world_size)]


def ranges_layout(layout: ArenaLayout, numels: list[int], ranges: list[tuple[int, int]]) -> ShardLayout:
    """This rank's :class:`ShardLayout` when it owns ``ranges`` of the vector and
    keeps every block (parameters already sharded, e.g. by FSDP2)."""
    return _local(layout, numels, _merge(sorted(ranges)), list(range(layout.num_blocks)))


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for lo, hi in ranges:
        if merged and merged[-1][1] == lo:
            merged[-1][1] = hi
        elif hi > lo:
            merged.append([lo, hi])
    return [tuple(r) for r in merged]


def _local(layout: ArenaLayout, numels: list[int], ranges, blocks: list[int]) -> ShardLayout:
    order, offsets, pieces = [], [], []
    local = 0
    for lo, hi in ranges:
        for pos, i in enumerate(layout.order):
            start = layout.param_offsets[pos]
            a, b = max(lo, start), min(hi, start + int(numels[i]))
            if a < b:
                order.append(i)
                offsets.append(local)
                pieces.append((a - start, b - start))
                local += b - a

    def to_local(x: int) -> int:
        """Owned elements before global position ``x``."""
        return sum(max(0, min(hi, x) - lo) for lo, hi in ranges)

    g = layout.block_bounds
    local_bounds = [to_local(g[blocks[0]])] if blocks else [0]
    local_bounds += [to_local(g[b + 1]) for b in blocks]
    return ShardLayout(
        order=tuple(order),
        param_offsets=tuple(offsets),
        block_bounds=tuple(local_bounds),
        pieces=tuple(pieces),
        blocks=tuple(blocks),
        ranges=tuple(tuple(r) for r in ranges),
    )
