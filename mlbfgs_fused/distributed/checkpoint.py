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

import torch


def _key(optimizer) -> str:
    partition = optimizer._partition
    if partition is None:
        raise ValueError("sharded_state_dict takes an optimizer built with distributed=...")
    return f"rank{partition.rank}_of_{partition.world_size}"


# LBFGS's state holds Python numbers (torch.optim.LBFGS's counters, its t and loss, the
# step size per arena), which DCP does not load into a template: they travel as 0-dim
# tensors and become numbers again as they load.
_NUMBERS = ("func_evals", "n_iter", "t", "prev_loss", "step_size")


def _numbers_as_tensors(state_dict: dict) -> dict:
    state = {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        for name in _NUMBERS:
            value = entry.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                entry[name] = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
        state[key] = entry
    return {**state_dict, "state": state}


def _numbers_back(state_dict: dict) -> dict:
    state = {}
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        for name in _NUMBERS:
            if isinstance(entry.get(name), torch.Tensor):
                entry[name] = entry[name].item()
        state[key] = entry
    return {**state_dict, "state": state}


def sharded_state_dict(optimizer) -> dict:
    """``{"rank<r>_of_<W>": optimizer.state_dict()}``, with the state of every group
    built first (as the first step builds it), so that a fresh optimizer offers DCP
    tensors of the right shapes to load into."""
    if hasattr(optimizer, "_init_group"):  # MLBFGS: per group
        for index, group in enumerate(optimizer.param_groups):
            optimizer._init_group(index, group)
    else:  # LBFGS: one model over every group
        optimizer._init_state()
        return {_key(optimizer): _numbers_as_tensors(optimizer.state_dict())}
    return {_key(optimizer): optimizer.state_dict()}


def load_sharded_state_dict(optimizer, state_dict: dict) -> None:
    """Load what :func:`sharded_state_dict` gave DCP back into ``optimizer``."""
    key = _key(optimizer)
    if key not in state_dict:
        raise ValueError(
            f"no optimizer shard for {key} in this checkpoint (it holds {sorted(state_dict)}): "
            "a distributed checkpoint loads at the world size that saved it"
        )
    state = state_dict[key]
    optimizer.load_state_dict(state if hasattr(optimizer, "_init_group") else _numbers_back(state))
