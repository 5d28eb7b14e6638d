"""Which elements each rank owns (no processes needed)."""

import random

import pytest

from mlbfgs_fused._state.layout import arena_layout
from mlbfgs_fused.distributed import assign_blocks, shard_layouts, shard_ranges


def test_shard_ranges_cover_the_vector_in_order():
    assert shard_ranges(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert shard_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]


def test_blocks_are_dealt_greedily_by_size():
    # Largest first to the least loaded rank: 9 -> 0, 7 -> 1, 5 -> 1, 2 -> 0, 1 -> 0 (12 | 12).
    assert assign_blocks([5, 9, 2, 7, 1], 2) == [1, 0, 0, 1, 0]
    assert assign_blocks([4], 3, first_rank=2) == [2]  # a lone block goes where the group points
    sizes = [3, 3, 3, 3]
    assert assign_blocks(sizes, 2) == assign_blocks(list(sizes), 2)  # deterministic


@pytest.mark.parametrize("mode", ["sharded", "blockwise"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_every_element_has_exactly_one_owner(mode, world_size):
    rng = random.Random(world_size)
    for blocks in ["group", "tensor", 7, [[2, 0], [1], [3]]]:
        numels = [rng.randint(1, 20) for _ in range(4)]
        layout = arena_layout(numels, blocks)
        shards = shard_layouts(layout, numels, mode, world_size)
        seen = []
        for shard in shards:
            assert shard.numel == sum(hi - lo for lo, hi in shard.ranges)
            local = 0
            for i, (a, b) in zip(shard.order, shard.pieces):
                start = layout.param_offsets[layout.order.index(i)]
                seen += range(start + a, start + b)
                assert 0 <= a < b <= numels[i]
            for pos in range(len(shard.order)):
                assert shard.param_offsets[pos] == local
                local += shard.piece_numel(pos)
            assert local == shard.numel
            # Local blocks are the global blocks cut to the owned elements.
            for lb, gb in enumerate(shard.blocks):
                lo, hi = layout.block_bounds[gb], layout.block_bounds[gb + 1]
                owned = sum(max(0, min(hi, h) - max(lo, l)) for l, h in shard.ranges)
                assert shard.block_bounds[lb + 1] - shard.block_bounds[lb] == owned
        assert sorted(seen) == list(range(layout.numel))
        if mode == "sharded":
            assert all(s.blocks == tuple(range(layout.num_blocks)) for s in shards)
        else:
            assert sorted(b for s in shards for b in s.blocks) == list(range(layout.num_blocks))
