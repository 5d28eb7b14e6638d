"""Block-diagonal layout of a parameter group (docs/design.md, "Blocks").

A group's parameters on one (device, dtype) are laid end to end in one flat
"arena". Every block is a contiguous range of that arena: the layout is a
parameter order plus block boundaries. Spelling the blocks this way lets one
kernel launch cover all blocks and lets every block keep its history as one
contiguous ``[m, n_block]`` matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ArenaLayout:
    """Where each parameter and each block lives in a flat arena.

    ``order[i]`` is the index (into the list the layout was built from) of the
    i-th parameter in the arena; ``param_offsets[i]`` is where it starts.
    Block ``b`` covers ``[block_bounds[b], block_bounds[b + 1])``.
    """

    order: tuple[int, ...]
    param_offsets: tuple[int, ...]
    block_bounds: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.block_bounds[-1]

    @property
    def num_blocks(self) -> int:
        return len(self.block_bounds) - 1

    def block_sizes(self) -> list[int]:
        b = self.block_bounds
        return [b[i + 1] - b[i] for i in range(self.num_blocks)]

    def block_first_param(self, block: int) -> int:
        """Arena position of the parameter holding the block's first element."""
        start = self.block_bounds[block]
        pos = 0
        while pos + 1 < len(self.param_offsets) and self.param_offsets[pos + 1] <= start:
            pos += 1
        return pos


def validate_blocks_spec(blocks) -> None:
    """Raise ValueError unless ``blocks`` is a spelling docs/design.md, "Blocks", allows."""
    if isinstance(blocks, str):
        if blocks not in ("group", "tensor"):
            raise ValueError(
                f"Invalid blocks value: {blocks!r} (expected 'group', 'tensor', "
                "a positive int or a list of lists of parameters)"
            )
        return
    if isinstance(blocks, bool) or not isinstance(blocks, (int, Sequence)):
        raise ValueError(f"Invalid blocks value: {blocks!r}")
    if isinstance(blocks, int):
        if blocks <= 0:
            raise ValueError(f"Invalid blocks value: {blocks}")
        return
    if len(blocks) == 0 or any(
        isinstance(b, (str, bytes)) or not isinstance(b, Sequence) or len(b) == 0
        for b in blocks
    ):
        raise ValueError("blocks given as a list must be a list of non-empty lists of parameters")


def arena_layout(numels: Sequence[int], blocks) -> ArenaLayout:
    """Lay out parameters with the given element counts into blocks.

    ``blocks`` is ``"group"`` (one block), ``"tensor"`` (one per parameter), a
    positive int (contiguous chunks of at most that many elements, as equal in
    size as possible) or a list of lists of parameter indices (one block per
    list; every index exactly once).
    """
    n_params = len(numels)
    if isinstance(blocks, (list, tuple)):
        order = [i for block in blocks for i in block]
        if sorted(order) != list(range(n_params)):
            raise ValueError(
                "blocks given as lists must name every parameter of the group exactly once"
            )
    else:
        order = list(range(n_params))
    offsets = [0]
    for i in order:
        offsets.append(offsets[-1] + int(numels[i]))
    total = offsets[-1]

    if blocks == "group":
        bounds = [0, total]
    elif blocks == "tensor":
        bounds = offsets
    elif isinstance(blocks, int):
        chunks = max(1, math.ceil(total / blocks))
        base, extra = divmod(total, chunks)
        bounds = [0]
        for c in range(chunks):
            bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    else:
        bounds = [0]
        for block in blocks:
            bounds.append(bounds[-1] + sum(int(numels[i]) for i in block))
    # An empty parameter would make an empty block; fold such blocks away.
    dedup = [bounds[0]]
    for b in bounds[1:]:
        if b != dedup[-1]:
            dedup.append(b)
    if len(dedup) == 1:
        dedup.append(dedup[0])
    return ArenaLayout(tuple(order), tuple(offsets[:-1]), tuple(dedup))
