"""LBFGS's passes as C++ ops on the CPU (``"cpp"``) and CUDA C++ ops (``"cuda"``).

Four ops, ``torch.ops.mlbfgs_fused_native.lbfgs_{gradient_dots, two_loop, direction,
move}`` (schemas in ``csrc/ops.cpp``, the contract in ``csrc/lbfgs.h``), registered per
device by ``csrc/cpu/lbfgs.cpp`` and ``csrc/cuda/lbfgs_*.cu``. An evaluation is one
``lbfgs_gradient_dots`` per arena and one ``lbfgs_two_loop``; an iteration adds one
``lbfgs_direction`` per arena (the pair's push, the direction, the saved point and the
first trial step, in one pass). The user's parameters and gradients are reached through
an address table per arena, rewritten only when a ``data_ptr`` changes (on CUDA from
pinned host memory, asynchronously: the previous copy has landed, since every
evaluation ends with the host's read). Every scratch tensor is made with the plan:
the per-chunk partial sums of all arenas in one matrix, the per-arena sums, the model,
the coefficients, the read vector.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_gradient_layout
from .._state.arena import same_order, state_strides
from .._state.lbfgs_arena import LBFGSArena
from . import LBFGSPlan
from ._lbfgs import P_DMAX, P_GMAX, SOURCE_GRAD, SOURCE_KEPT, LBFGSPlanBase, partial_width, scalar_column
from .native import CHUNK_COLUMNS, chunk_tables


def _ops():
    return torch.ops.mlbfgs_fused_native


class AddressTable:
    """One arena's ``[count, 2]`` int64 table of the parameters' and gradients' addresses
    (0 where a parameter has no gradient), on the arena's device. A gradient laid out
    otherwise than its parameter is staged into a buffer laid out like it."""

    def __init__(self, arena: LBFGSArena):
        self.arena = arena
        count = len(arena.params)
        self.device = arena.device
        cuda = self.device.type == "cuda"
        self.table = torch.zeros(count, 2, dtype=torch.int64, device=self.device)
        self.host = torch.zeros(count, 2, dtype=torch.int64, pin_memory=cuda) if cuda else self.table
        self.host_rows = self.host.numpy()
        self.entries: list[int] | None = None
        self.stages: dict[int, Tensor] = {}
        self.orders = [state_strides(p) for p in arena.local_params()]
        self.seen: list | None = None  # the gradient objects (and addresses) the table was made from

    def refresh(self) -> None:
        # The tensors stepped are the arena's hooks (the parameters, or a distributed
        # rank's pieces of them); what the checks depend on is the user's tensors.
        seen = [(p.data_ptr(), _identity(p.grad)) for p in self.arena.params]
        if seen == self.seen and not self.stages:
            return  # the same tensors, laid out as last time: nothing to check or write
        self.seen = None
        entries = []
        for i, (p, g) in enumerate(zip(self.arena.local_params(), self.arena.local_grads())):
            address = 0
            if g is not None:
                _check_gradient(p, g)
                if not same_order(p.shape, g.stride(), self.orders[i]):
                    stage = self.stages.get(i)
                    if stage is None:
                        stage = self.stages[i] = torch.empty_like(p)
                    stage.copy_(g)
                    g = stage
                address = g.data_ptr()
            entries += (p.data_ptr(), address)
        if entries != self.entries:
            self.host_rows.reshape(-1)[:] = entries
            if self.host is not self.table:
                self.table.copy_(self.host, non_blocking=True)
            self.entries = entries
        self.seen = seen


def _identity(g: Tensor | None) -> tuple | None:
    """What a table entry's checks depend on: the object, its storage and its layout."""
    if g is None:
        return None
    if g.layout != torch.strided:
        return (id(g), g.layout)
    return (id(g), g.data_ptr(), g.shape, g.stride(), g.dtype, g.device)


def _check_gradient(p: Tensor, g: Tensor) -> None:
    if g.is_sparse:
        raise RuntimeError("LBFGS's fused backends do not support sparse gradients; use foreach=True")
    check_gradient_layout(p, g, "LBFGS")


class AddressedLBFGSPlan(LBFGSPlanBase):
    """What the plans that reach the user's tensors through address tables share (C++,
    CUDA C++, Triton): the tables, the arenas' per-piece partial sums in one matrix
    (``pieces[a]`` rows for arena ``a``), their per-arena sums, the scales on the device."""

    def __init__(self, arenas: list[LBFGSArena], gram: Tensor, pair_count: Tensor, maximize: bool,
                 line_search: bool):
        dev = gram.device
        self.scales_t = torch.ones(len(arenas), dtype=torch.float64, device=dev)
        self.scales_host = torch.ones(len(arenas), dtype=torch.float64, pin_memory=dev.type == "cuda")
        self._scales = [1.0] * len(arenas)
        super().__init__(arenas, gram, pair_count, maximize, line_search)
        self.tables = [AddressTable(a) for a in arenas]

    def _partials(self, pieces: list[int]) -> None:
        dev, W = self.home, partial_width(self.m)
        rows = [0]
        for count in pieces:
            rows.append(rows[-1] + count)
        self.partials = torch.zeros(rows[-1], W, dtype=torch.float64, device=dev)
        self.partial_rows = [self.partials[a:b] for a, b in zip(rows, rows[1:])]
        self.arena_rows = torch.tensor(rows, dtype=torch.int64).to(dev)
        self.sums = torch.zeros(len(self.arenas) + 1, W, dtype=torch.float64, device=dev)
        self.unit_rows = torch.arange(len(self.arenas) + 1, dtype=torch.int64).to(dev)

    def _two_loop_rows(self, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """What two_loop sums: the pieces' partial rows, or ``rows`` (``[A, W]``, one
        complete row per arena, from a distributed plan)."""
        return (self.partials, self.arena_rows) if rows is None else (rows, self.unit_rows)

    def local_rows(self, out: Tensor) -> None:
        """This plan's partial sums, one row per arena, into ``out`` (``[A, W]`` on the
        first arena's device): the pieces' rows summed, the maxima columns (``max |g|``,
        ``max |d|``) their maxima. What a distributed plan completes over the ranks."""
        hi = scalar_column(self.m, P_DMAX) + 1
        lo = scalar_column(self.m, P_GMAX)
        if hi - lo != 2:
            raise AssertionError("the maxima columns are adjacent")
        for a, rows in enumerate(self.partial_rows):
            if rows.shape[0] == 0:
                out[a].zero_()
                continue
            torch.sum(rows, 0, out=out[a])
            torch.amax(rows[:, lo:hi], 0, out=out[a, lo:hi])

    @property
    def scales(self) -> list[float]:
        return self._scales

    @scales.setter
    def scales(self, values: list[float]) -> None:
        if list(values) != self._scales:
            self._scales = list(values)
            self.scales_host.numpy()[:] = self._scales
            self.scales_t.copy_(self.scales_host, non_blocking=True)

    def _source(self, a: int, source: int) -> Tensor | None:
        if source == SOURCE_GRAD:
            return None
        return self.kept[a] if source == SOURCE_KEPT else self.arenas[a].prev_grad

    def _direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool, push: bool,
                   combine: bool) -> None:
        """The one direction pass: the pair pushed (``push``), ``d`` formed (``combine``)."""
        raise NotImplementedError

    def push(self, source: int, alphas: list[float]) -> None:
        self._direction(source, alphas, None, False, True, False)

    def direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool,
                  push: bool) -> None:
        self._direction(source, alphas, moves, save, push, True)


class NativeLBFGSPlan(AddressedLBFGSPlan, LBFGSPlan):
    def __init__(self, arenas: list[LBFGSArena], gram: Tensor, pair_count: Tensor, maximize: bool,
                 line_search: bool):
        super().__init__(arenas, gram, pair_count, maximize, line_search)
        self.chunks = []
        for arena in arenas:
            table, _ = chunk_tables(arena.layout, self.m)
            self.chunks.append(torch.tensor(table, dtype=torch.int64).view(-1, CHUNK_COLUMNS).to(self.home))
        self._partials([c.shape[0] for c in self.chunks])

    def bind(self) -> None:
        for table in self.tables:
            table.refresh()

    def gradient_dots(self, source: int, alphas: list[float], pair: bool, ring: bool, gd: bool = False,
                      l1: bool = False) -> None:
        op = _ops().lbfgs_gradient_dots
        for a, arena in enumerate(self.arenas):
            op(self.tables[a].table, self._source(a, source), arena.history_s, arena.history_y, arena.direction,
               arena.prev_grad, self.chunks[a], self.pair_count, self.partial_rows[a], alphas[a], self.maximize,
               pair, ring, gd, l1, self.m)

    def two_loop(self, loss: Tensor | None, pair: bool, direction: bool, rows: Tensor | None = None) -> None:
        partials, arena_rows = self._two_loop_rows(rows)
        _ops().lbfgs_two_loop(partials, arena_rows, self.scales_t, loss, self.gram, self.pair_count,
                              self.sums, self.model, self.coef, self.read, pair, direction, self.m)

    def _direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool, push: bool,
                   combine: bool) -> None:
        op = _ops().lbfgs_direction
        for a, arena in enumerate(self.arenas):
            commit = push and a == 0  # the model becomes the state once
            op(self.tables[a].table, self._source(a, source), arena.history_s, arena.history_y, arena.direction,
               arena.prev_grad, self.saved[a] if save else None, self.chunks[a], self.coef, self.model,
               self.partial_rows[a], self.gram if commit else None, self.pair_count if commit else None,
               alphas[a], 0.0 if moves is None else moves[a], push, combine, moves is not None, save,
               self.maximize, self.m)

    def move(self, alphas: list[float], from_saved: bool) -> None:
        op = _ops().lbfgs_move
        for a, arena in enumerate(self.arenas):
            op(self.tables[a].table, self.saved[a] if from_saved else None, arena.direction, self.chunks[a], alphas[a])
