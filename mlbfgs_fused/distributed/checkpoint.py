"""``torch.distributed.checkpoint`` (DCP) for a distributed ``MLBFGS`` or ``LBFGS``: each rank saves its shard.

DCP keeps one copy of an entry that every rank saves under the same key (it takes it for
replicated), while each rank's ``optimizer.state_dict()`` holds that rank's own shard
under the same keys. :func:`sharded_state_dict` therefore files it under a key naming the
rank and the world size, so DCP writes every rank's shard; loading at another world size
finds no entry for the rank and DCP raises.

::

    dcp.save({"optim": sharded_state_dict(opt)}, checkpoint_id=path)
    ...
    state = {"optim": sharded_state_dict(opt)}  # this rank's tensors, to be filled in place
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(opt, state["optim"])
"""

from __future__ import annotations


def _key(optimizer) -> str:
    partition = optimizer._partition
    if partition is None:
        raise ValueError("sharded_state_dict takes an optimizer built with distributed=...")
    return f"rank{partition.rank}_of_{partition.world_size}"


def sharded_state_dict(optimizer) -> dict:
    """``{"rank<r>_of_<W>": optimizer.state_dict()}``, with the state of every group
    built first (as the first step builds it), so that a fresh optimizer offers DCP
    tensors of the right shapes to load into."""
    if hasattr(optimizer, "_init_group"):  # MLBFGS: per group
        for index, group in enumerate(optimizer.param_groups):
            optimizer._init_group(index, group)
    else:  # LBFGS: one model over every group
        optimizer._setup()
    return {_key(optimizer): optimizer.state_dict()}


def load_sharded_state_dict(optimizer, state_dict: dict) -> None:
    """Load what :func:`sharded_state_dict` gave DCP back into ``optimizer``."""
    key = _key(optimizer)
    if key not in state_dict:
        raise ValueError(
            f"no optimizer shard for {key} in this checkpoint (it holds {sorted(state_dict)}): "
            "a distributed checkpoint loads at the world size that saved it"
        )
    optimizer.load_state_dict(state_dict[key])
