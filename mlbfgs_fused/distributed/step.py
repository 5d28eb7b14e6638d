"""The step of a distributed ``MLBFGS``: the group's backend (foreach, C++, CUDA C++ or
Triton) steps each rank's :class:`ShardArena` s.

Per group (docs/design.md, "Distributed"): pass 1 runs on each rank's elements and its
per-block sums are completed by :meth:`ShardArena.block_sum`; every rank then runs the
same two-loop on the same scalars and updates its elements; :meth:`ShardArena.publish`
all-gathers them into the full parameters. The non-finite-step verdict is global: the
finiteness probes are all-reduced (``"sharded"``: they already are, being sums of
``g.g`` over every rank's elements), and so is ``GradScaler``'s ``found_inf``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor

from .. import backends
from ..backends import Plan
from .._math import NORMALIZE_NEVER, normalize_mode
from .arena import ShardArena
from .sharding import ranges_layout, shard_layouts

MODES = ("sharded", "blockwise")


class Partition:
    """What an optimizer built with ``distributed=`` needs: the mode, the process
    group, and this rank's place in it."""

    def __init__(self, mode: str, process_group=None, owner: str = "MLBFGS", modes: tuple[str, ...] = MODES):
        if mode not in modes:
            raise ValueError(f"Invalid distributed value: {mode!r} (expected None or one of {modes})")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{owner}(distributed={mode!r}) needs the default process group: call "
                "torch.distributed.init_process_group first"
            )
        self.mode = mode
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)

    def check_group(self, group: dict) -> None:
        """Raise for what a distributed optimizer cannot step yet."""
        if group["capturable"]:
            raise NotImplementedError(f"MLBFGS(distributed={self.mode!r}) does not support capturable=True yet")
        sharded = [_is_dtensor(p) for p in group["params"]]
        if any(sharded):
            if self.mode != "sharded" or not all(sharded):
                raise NotImplementedError(
                    "DTensor parameters (FSDP2 fully_shard) are supported with "
                    "distributed='sharded' only, in groups of DTensor parameters only"
                )
            for p in group["params"]:
                _check_fsdp_placement(p, self.world_size)

    def plan(self, arenas: list[ShardArena], group: dict) -> DistributedPlan:
        return DistributedPlan(self, arenas, group)

    def arena(self, params, layout, history_size, history_dtype, salt: int = 0) -> ShardArena:
        """This rank's arena of ``params`` (laid out by ``layout``); ``salt`` (the group's
        index) spreads single-block groups over the ranks under ``"blockwise"``."""
        numels = [p.numel() for p in params]
        if _is_dtensor(params[0]):  # FSDP2: the rank owns the local shards it already holds
            ranges = [_local_range(params[i], layout.param_offsets[pos]) for pos, i in enumerate(layout.order)]
            own = ranges_layout(layout, numels, ranges)
            return ShardArena(
                params, [own], 0, self.mode, self.process_group, history_size, history_dtype, dtensor=True
            )
        layouts = shard_layouts(layout, numels, self.mode, self.world_size, salt % self.world_size)
        return ShardArena(
            params, layouts, self.rank, self.mode, self.process_group, history_size, history_dtype
        )

    def lbfgs_arena(self, params, layout, history_size, history_dtype, group: int, index: int):
        """This rank's :class:`LBFGSShardArena` of an LBFGS arena: its contiguous slice."""
        from .arena import LBFGSShardArena

        layouts = shard_layouts(layout, [p.numel() for p in params], "sharded", self.world_size)
        return LBFGSShardArena(params, layouts, self.rank, self.process_group, history_size, history_dtype,
                               group, index)

    def lbfgs_plan(self, inner, arenas):
        """The backend's LBFGS plan ``inner`` over this rank's arenas, completed over the ranks."""
        from .lbfgs import ShardedLBFGSPlan

        return ShardedLBFGSPlan(inner, arenas, self.process_group, self.rank, self.world_size)

    # -- checkpoints: each rank saves and loads its own shard ------------------------
    def describe(self) -> dict:
        return {"mode": self.mode, "world_size": self.world_size, "rank": self.rank}

    def state_dict_post_hook(self, optimizer, state_dict: dict) -> dict:
        state_dict["distributed"] = self.describe()
        return state_dict

    def load_state_dict_pre_hook(self, optimizer, state_dict: dict) -> dict:
        saved = state_dict.pop("distributed", None)
        here = self.describe()
        if saved != here:
            raise ValueError(
                f"this optimizer state is the shard of {_shard_name(saved)}, but this optimizer is "
                f"{_shard_name(here)}: a distributed optimizer loads the shard its own rank saved, "
                "at the same world size and mode (resharding is not supported)"
            )
        return state_dict


def _shard_name(desc: dict | None) -> str:
    if desc is None:
        return "a single-process optimizer"
    return f"rank {desc['rank']} of {desc['world_size']} ({desc['mode']})"


def _is_dtensor(p: Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless imported
    return module is not None and isinstance(p, module.DTensor)


def _check_fsdp_placement(p, world_size: int) -> None:
    """A DTensor parameter as ``fully_shard`` makes it: rows split evenly over a 1-D
    mesh of the optimizer's ranks (``torch.chunk`` sizes)."""
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or mesh.size() != world_size or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(
            "MLBFGS(distributed='sharded') takes DTensor parameters sharded on dim 0 over a "
            f"1-D mesh of its {world_size} ranks (FSDP2 fully_shard); got placements "
            f"{tuple(p.placements)} on a mesh of shape {tuple(mesh.shape)}"
        )


def _local_range(p, offset: int) -> tuple[int, int]:
    """The elements ``[lo, hi)`` of the arena's vector held by this rank's shard of
    ``p`` (which starts at ``offset``): whole rows, ``torch.chunk`` of dim 0."""
    rows = p.shape[0]
    row = p.numel() // rows if rows else 0
    chunk = -(-rows // p.device_mesh.size())
    first = min(rows, p.device_mesh.get_coordinate()[0] * chunk)
    held = p.to_local().shape[0] if p.dim() else 0
    if first + held > rows or (held and held != min(rows, first + chunk) - first):
        raise NotImplementedError(f"a DTensor shard of {held} rows from row {first} is not a torch.chunk shard")
    return offset + first * row, offset + (first + held) * row


class DistributedPlan(Plan):
    """The passes of a rank's :class:`ShardArena` s (mlbfgs_fused/backends/__init__.py),
    on top of the plan of the group's backend over the arenas the rank keeps blocks
    of. The backend completes its sums through the arenas' hooks; what is left here is
    the verdict, a rank without blocks taking part in the group's collectives, and
    the all-gather."""

    def __init__(self, partition: Partition, arenas: list[ShardArena], group: dict):
        self.partition = partition
        self.arenas = arenas
        self.devices = list(dict.fromkeys(a.device for a in arenas))
        self.active = [a for a in arenas if a.active]
        module = backends.select(group).module
        self.inner = module.plan(self.active, group) if self.active else None

    def prepare(self, group: dict) -> bool:
        if self.inner:
            self.inner.prepare(group)
        return any(p.grad is not None for p in group["params"])

    def gradient_dots(self, group: dict, amp) -> list[Tensor]:
        """Pass 1 on this rank's blocks, and the global finiteness probes."""
        done = iter(self.inner.gradient_dots(group, amp) if self.inner else [])
        home = self.arenas[0].device
        zero = torch.zeros((), dtype=torch.float64, device=home)
        probes = torch.stack([next(done).to(home) if a.active else zero for a in self.arenas])
        blockwise = self.partition.mode == "blockwise"
        found_inf = None if amp is None else amp.found_inf
        if not blockwise and found_inf is None:
            return list(probes.unbind())  # sums over every rank's elements already
        # One all-reduce: this rank's probes ("blockwise") and its own inf check.
        flags = probes.clone() if blockwise else torch.zeros_like(probes)
        if found_inf is not None:
            flags[0] += torch.where(found_inf.to(home) != 0, torch.inf, 0.0)
        dist.all_reduce(flags, group=self.partition.process_group)
        return list((flags if blockwise else probes + flags).unbind())

    def two_loop(self, group: dict, ok: dict, after_push: bool = False) -> None:
        if self.inner:
            self.inner.two_loop(group, ok, after_push)
        elif normalize_mode(group["normalize"]) != NORMALIZE_NEVER:
            # Take part in the group's norm of d: every backend completes it with one
            # group_sum of (||d||^2, pairs held) once per step (foreach in this pass).
            self.arenas[0].group_sum(torch.zeros(2, dtype=torch.float64, device=self.arenas[0].device))

    def update(self, group: dict, ok: dict, amp, averages: bool = True, direction: bool = True) -> None:
        if self.inner:
            self.inner.update(group, ok, amp, averages, direction)

    def push(self, group: dict, ok: dict, amp) -> None:
        if self.inner:
            self.inner.push(group, ok, amp)

    def commit(self, group: dict, ok: dict) -> None:
        if self.inner:
            self.inner.commit(group, ok)
        for arena in self.arenas:
            arena.publish()
