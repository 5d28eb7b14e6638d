"""LBFGS's passes as Triton launches (``kernels/lbfgs_*.py``; docs/design.md, "LBFGS").

An evaluation is one ``lbfgs_gradient_dots`` launch per arena and one ``lbfgs_two_loop``
program; an iteration adds one ``lbfgs_direction`` launch per arena (the pair's push,
the direction, the saved point and the first trial step), a later line-search trial one
``lbfgs_move``. The geometry is the fused backend's (:func:`.triton.plan_tables`: tiles
inside one parameter, a bounded number of workers per arena, one row of partial sums per
worker, all arenas' rows in one matrix); the user's tensors are reached through an address
table per arena (:class:`.lbfgs_native.AddressTable`, uploaded only when a ``data_ptr``
changes). Step lengths go to the kernels through a float64 device vector written by fills
(a Triton float argument would be float32). Nothing is allocated after the plan and no
launch reads a device value on the host.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .._state.lbfgs_arena import LBFGSArena
from . import LBFGSPlan
from .lbfgs_native import AddressedLBFGSPlan


class TritonLBFGSPlan(AddressedLBFGSPlan, LBFGSPlan):
    def __init__(self, arenas: list[LBFGSArena], gram: Tensor, pair_count: Tensor, maximize: bool,
                 line_search: bool, tile: int | None = None):
        from ..kernels import common, lbfgs_direction, lbfgs_gradient_dots, lbfgs_two_loop
        from . import triton as _triton

        dev = gram.device
        super().__init__(arenas, gram, pair_count, maximize, line_search)
        self.k_dots, self.k_two_loop, self.k_direction = lbfgs_gradient_dots, lbfgs_two_loop, lbfgs_direction
        self.tile = _triton.TILE if tile is None else tile
        cap = _triton.worker_cap(dev)
        self.guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        self.tiles, self.workers, self.tiles_aligned = [], [], []
        for arena in arenas:
            tiles, workers, _ = _triton.plan_tables(arena.layout, self.m, self.tile, cap)
            align = common.ALIGN
            self.tiles_aligned.append(
                all(x % align == 0 for row in tiles for x in row[:2] + row[3:])
                and all(row[4] % align == 0 and row[5] % align == 0 for row in workers)
            )
            self.tiles.append(_triton._table(tiles, 4, dev))
            self.workers.append(_triton._table(workers, 6, dev))
        self._partials([w.shape[0] for w in self.workers])
        self.steps = torch.zeros(len(arenas), 2, dtype=torch.float64, device=dev)
        self.step_slots = [row.unbind(0) for row in self.steps]
        self.step_values = [[0.0, 0.0] for _ in arenas]
        self.aligned = [False] * len(arenas)

    def bind(self) -> None:
        for a, table in enumerate(self.tables):
            table.refresh()
            self.aligned[a] = self.tiles_aligned[a] and all(x % 16 == 0 for x in table.entries)

    def _set_steps(self, column: int, values: list[float]) -> None:
        for a, value in enumerate(values):
            if self.step_values[a][column] != value:
                self.step_slots[a][column].fill_(value)
                self.step_values[a][column] = value

    def gradient_dots(self, source: int, alphas: list[float], pair: bool, ring: bool, gd: bool = False,
                      l1: bool = False) -> None:
        # g.d and |g|_1 ride along with the pass's other sums: a GPU is bound by the bytes.
        self._set_steps(0, alphas)
        with self.guard:
            for a, arena in enumerate(self.arenas):
                self.k_dots.lbfgs_gradient_dots(
                    self.tables[a].table, self.tiles[a], self.workers[a], self._source(a, source),
                    arena.history_s, arena.history_y, arena.direction, arena.prev_grad, self.pair_count,
                    self.steps[a], self.partial_rows[a], self.m, self.maximize, pair, ring, self.tile,
                    self.aligned[a],
                )

    def two_loop(self, loss: Tensor | None, pair: bool, direction: bool, rows: Tensor | None = None) -> None:
        partials, arena_rows = self._two_loop_rows(rows)
        with self.guard:
            self.k_two_loop.lbfgs_two_loop(
                partials, arena_rows, self.scales_t, loss, self.gram, self.pair_count, self.sums,
                self.model, self.coef, self.read, self.m, pair, direction,
            )

    def _direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool, push: bool,
                   combine: bool) -> None:
        self._set_steps(0, alphas)
        if moves is not None:
            self._set_steps(1, moves)
        with self.guard:
            for a, arena in enumerate(self.arenas):
                commit = push and a == 0
                self.k_direction.lbfgs_direction(
                    self.tables[a].table, self.tiles[a], self.workers[a], self._source(a, source),
                    arena.history_s, arena.history_y, arena.direction, arena.prev_grad,
                    self.saved[a] if save else None, self.coef, self.model, self.partial_rows[a],
                    self.gram if commit else None, self.pair_count if commit else None, self.steps[a],
                    self.m, self.maximize, push, combine, moves is not None, self.tile, self.aligned[a],
                )

    def move(self, alphas: list[float], from_saved: bool) -> None:
        self._set_steps(1, alphas)
        with self.guard:
            for a, arena in enumerate(self.arenas):
                self.k_direction.lbfgs_move(
                    self.tables[a].table, self.tiles[a], self.workers[a], self.saved[a] if from_saved else None,
                    arena.direction, self.steps[a], self.tile, self.aligned[a],
                )
