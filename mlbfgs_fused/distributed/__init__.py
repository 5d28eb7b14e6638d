"""Distributed ``MLBFGS`` on ``torch.distributed`` (docs/design.md, "Distributed").

``MLBFGS(..., distributed="sharded" | "blockwise", process_group=None)``: every rank
keeps the optimizer state of its part of each arena only (:mod:`.sharding`), the
group's backend (any of them) steps that part through a :class:`~.arena.ShardArena`
whose two reduction hooks complete the inner products with one small all-reduce each, and the
updated elements are all-gathered into the parameters, which every rank keeps whole
(as under ``DistributedDataParallel``, whose averaged gradients are used as they are).
Parameters that are ``DTensor`` s sharded on dim 0 (FSDP2 ``fully_shard``) stay sharded:
under ``"sharded"`` a rank owns the rows it holds and steps its local shards in place.

Imports run one way: ``_state`` and ``backends`` -> ``distributed`` -> ``mlbfgs``.
"""

from .checkpoint import load_sharded_state_dict, sharded_state_dict
from .step import MODES, DistributedPlan, Partition
from .sharding import ShardLayout, assign_blocks, shard_layouts, shard_ranges

__all__ = [
    "MODES",
    "DistributedPlan",
    "Partition",
    "ShardLayout",
    "assign_blocks",
    "load_sharded_state_dict",
    "shard_layouts",
    "shard_ranges",
    "sharded_state_dict",
]
