"""A rank's part of an arena: the state of its owned elements, and the two reductions.

A :class:`ShardArena` is an :class:`~mlbfgs_fused._state.arena.Arena` over a
:class:`~.sharding.ShardLayout`: its "parameters" are pieces ``p.view(-1)[a:b]`` of
the group's parameters (and ``p.grad.view(-1)[a:b]`` of their gradients; flat in
memory order, :meth:`ShardArena.local_param` and :meth:`ShardArena.local_grad`), so
every backend steps a rank's elements exactly as it steps a whole arena. Its
inner products are completed by the two hooks the backend calls:

``block_sum(x)``
    a per-block partial sum over this rank's elements (``S g``, ``Y g``, ``g.g``;
    on pair steps the damping sums, curvatures and Gram rows) made whole. ``"sharded"``: one all-reduce
    of ``x`` (every rank holds a part of every block); ``"blockwise"``: nothing (a
    block lives on one rank).
``group_sum(x)``
    a sum over the group's blocks made whole (the norm of ``d``, the count of blocks
    holding a pair). ``"sharded"``: nothing (every rank already sums every block);
    ``"blockwise"``: one all-reduce.

After the step :meth:`ShardArena.publish` all-gathers every rank's updated elements
back into the full parameters, which stay replicated on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .._state.arena import Arena, _copy_checked, is_dense
from .._state.lbfgs_arena import LBFGSArena
from .sharding import ShardLayout


def _all_gather(output: Tensor, input: Tensor, group) -> None:
    # torch 2.13 renames all_gather_into_tensor all_gather_single (looked up at each
    # call, so a wrapper of either, as bench/distributed.py puts, sees it).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=group)


def flat_view(t: Tensor) -> Tensor:
    """A parameter or gradient as a flat view in memory order (contiguous, or dense in
    another dimension order: channels_last, a transpose)."""
    if t.is_contiguous():
        return t.view(-1)
    if not is_dense(t):
        raise RuntimeError(
            "MLBFGS(distributed=...) needs dense parameters and gradients, got one with shape "
            f"{tuple(t.shape)} and strides {t.stride()}"
        )
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class ShardPieces:
    """What a rank's arena of pieces adds to an arena of whole parameters (MLBFGS's
    :class:`ShardArena`, LBFGS's :class:`LBFGSShardArena`): the pieces' geometry, the
    hooks the backends read parameters and gradients through, :meth:`publish`, and the
    state of a parameter as the range of its pieces."""

    OWNER = "MLBFGS"  # the optimizer named in errors

    def _init_shard(self, params: list[Tensor], layouts: list[ShardLayout], rank: int, mode: str,
                    process_group, dtensor: bool = False) -> None:
        self.all_params = params  # in the order the layouts index them
        self.layouts = layouts
        self.rank = rank
        self.mode = mode
        self.process_group = process_group
        self.partial_blocks = mode == "sharded"
        self.partial_group = mode == "blockwise"
        # DTensor parameters sharded on dim 0 (FSDP2): a piece is a whole local shard,
        # and the parameters stay sharded (nothing to all-gather).
        self.dtensor = dtensor
        if not dtensor:
            # All-gather staging: every rank's local vector, padded to the longest one.
            width = max(lay.numel for lay in layouts)
            self.send = torch.zeros(width, dtype=self.dtype, device=self.device)
            self.recv = torch.zeros(width * len(layouts), dtype=self.dtype, device=self.device)

    # -- geometry: pieces instead of whole parameters ----------------------------
    def param_slice(self, i: int) -> slice:
        start = self.layout.param_offsets[i]
        return slice(start, start + self.layout.piece_numel(i))

    def param_view(self, flat: Tensor, i: int) -> Tensor:
        return flat[self.param_slice(i)]

    def local_param(self, i: int) -> Tensor:
        if self.dtensor:
            return flat_view(self.params[i].to_local())
        start, stop = self.layout.pieces[i]
        return flat_view(self.params[i])[start:stop]

    def local_grad(self, i: int) -> Tensor | None:
        p, grad = self.params[i], self.params[i].grad
        if grad is None:
            return None
        if self.dtensor:
            p, grad = p.to_local(), grad.to_local()
        if grad.stride() != p.stride():
            raise RuntimeError(
                f"{self.OWNER}(distributed=...) needs each gradient laid out like its parameter, got "
                f"strides {grad.stride()} for a parameter with strides {p.stride()}"
            )
        if self.dtensor:
            return flat_view(grad)
        start, stop = self.layout.pieces[i]
        return flat_view(grad)[start:stop]

    def local_params(self) -> list[Tensor]:
        return [self.local_param(i) for i in range(len(self.params))]

    def local_grads(self) -> list[Tensor | None]:
        return [self.local_grad(i) for i in range(len(self.params))]

    @property
    def active(self) -> bool:
        """Whether this rank keeps any block of the arena (always, when sharded)."""
        return self.layout.num_blocks > 0

    # -- the reductions ---------------------------------------------------------
    def block_sum(self, x: Tensor) -> Tensor:
        if self.mode == "sharded":
            dist.all_reduce(x, group=self.process_group)
        return x

    def group_sum(self, x: Tensor) -> Tensor:
        if self.mode == "blockwise":
            dist.all_reduce(x, group=self.process_group)
        return x

    # -- parameters back on every rank --------------------------------------------
    def publish(self) -> None:
        """All-gather every rank's elements into the full parameters."""
        if self.dtensor or len(self.layouts) == 1:
            return  # the rank wrote all the elements it holds in place
        lay = self.layout
        if lay.order:
            pieces = [self.local_param(i) for i in range(len(lay.order))]
            torch._foreach_copy_([self.param_view(self.send, i) for i in range(len(pieces))], pieces)
        _all_gather(self.recv, self.send, group=self.process_group)
        width = self.send.numel()
        dst, src = [], []
        for r, peer in enumerate(self.layouts):
            if r == self.rank:
                continue  # its elements were written in place
            for i, (start, stop) in enumerate(peer.pieces):
                offset = r * width + peer.param_offsets[i]
                dst.append(flat_view(self.all_params[peer.order[i]])[start:stop])
                src.append(self.recv[offset : offset + stop - start])
        if dst:
            torch._foreach_copy_(dst, src)

    # -- optimizer.state ----------------------------------------------------------
    def _pieces_by_param(self) -> list[list[int]]:
        spans: dict[int, list[int]] = {}  # parameter -> its pieces, adjacent in the local vector
        for i, p in enumerate(self.params):
            spans.setdefault(id(p), []).append(i)
        return list(spans.values())

    def _range(self, pieces: list[int]) -> slice:
        lay = self.layout
        return slice(lay.param_offsets[pieces[0]], lay.param_offsets[pieces[-1]] + lay.piece_numel(pieces[-1]))

    def fill(self, state: dict) -> None:
        """As :meth:`Arena.fill`, with ``state[p]`` holding the flat state of ``p``'s
        owned elements (the rank's shard: one range of the local vector, as all the
        pieces of a parameter are adjacent there)."""
        owners = self.blocks_by_param()
        with torch.no_grad():
            for pieces in self._pieces_by_param():
                p_state = state[self.params[pieces[0]]]
                for key in self.PARAM_KEYS:
                    view = self.flat_state[key][self._range(pieces)]
                    if key in p_state:
                        _copy_checked(view, p_state[key], key)
                    elif key == "param_ema":
                        for i in pieces:  # the EMA of the parameters starts at the parameters
                            self.param_view(self.flat_state[key], i).copy_(self.local_param(i))
                blocks = [b for i in pieces for b in owners.get(i, [])]
                self._copy_blocks(p_state, blocks, None, self.params[pieces[0]])

    def bind(self, state: dict) -> None:
        owners = self.blocks_by_param()
        for pieces in self._pieces_by_param():
            p_state = state[self.params[pieces[0]]]
            for key in self.PARAM_KEYS:
                p_state[key] = self.flat_state[key][self._range(pieces)]
            self._point_blocks(p_state, [b for i in pieces for b in owners.get(i, [])])


class ShardArena(ShardPieces, Arena):
    """A rank's part of an MLBFGS arena (module docstring)."""

    def __init__(
        self,
        params: list[Tensor],
        layouts: list[ShardLayout],
        rank: int,
        mode: str,
        process_group,
        history_size: int,
        history_dtype: torch.dtype | None,
        dtensor: bool = False,
    ):
        Arena.__init__(self, params, layouts[rank], history_size, history_dtype)
        self._init_shard(params, layouts, rank, mode, process_group, dtensor)


class LBFGSShardArena(ShardPieces, LBFGSArena):
    """A rank's part of an LBFGS arena under ``LBFGS(distributed="sharded")``: its
    contiguous slice of the arena's vector (direction, previous gradient and the ring's
    columns of those elements; docs/design.md, "Distributed"). The Gram rows and the
    line search's dots are completed by the plan (:mod:`.lbfgs`), not by the hooks."""

    OWNER = "LBFGS"

    def __init__(self, params: list[Tensor], layouts: list[ShardLayout], rank: int, process_group,
                 history_size: int, history_dtype: torch.dtype | None, group: int, index: int):
        LBFGSArena.__init__(self, params, layouts[rank], history_size, history_dtype, group, index)
        self._init_shard(params, layouts, rank, "sharded", process_group)
