"""``LBFGS(distributed="sharded")``: each rank keeps the history, direction and previous
gradient of its slice of every arena (docs/design.md, "Distributed").

A rank's arenas are :class:`~.arena.LBFGSShardArena` s (its contiguous slice of each
arena's vector, the slices of :func:`~.sharding.shard_ranges`); the backend's LBFGS plan
steps them through the arenas' hooks (``local_params()``, ``local_grads()``), so every
backend runs a rank's pieces as it runs whole parameters. :class:`ShardedLBFGSPlan`
adds, per closure evaluation, one all-reduce of a small float64 vector that completes
the rank's partial rows (the Gram rows, the line search's dots, ``|g|_1``, the loss)
before the model, and, after every pass that moves the parameters, the all-gather of
each arena's updated slice into the full parameters the closure evaluates.

The all-reduce is a sum. The two columns that are maxima (``max |g|``, ``max |d|``) go
in it as one slot per rank, zero elsewhere: the sum of a slot is its rank's maximum,
exactly, and every rank takes the maximum over the slots. The loss is summed and
divided by the world size (the closure's loss averaged, as its gradients are by DDP).
Every rank gets the same reduced vector, runs the same model on it and reads the same
vector on the host: the ranks take the same decisions. On one rank nothing is added:
the backend's plan runs as it does without ``distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends._lbfgs import P_DMAX, P_GMAX, partial_width, scalar_column


class ShardedLBFGSPlan:
    """The passes of a rank's :class:`~.arena.LBFGSShardArena` s: the backend's plan
    ``inner`` over them, with the reduction before the model and the all-gather after
    each move. Other attributes are ``inner``'s."""

    def __init__(self, inner, arenas: list, process_group, rank: int, world_size: int):
        self.inner = inner
        self.arenas = arenas
        self.process_group = process_group
        self.rank, self.world_size = rank, world_size
        A, W = len(arenas), partial_width(inner.m)
        self.width = W
        self.max_lo = scalar_column(inner.m, P_GMAX)
        if scalar_column(inner.m, P_DMAX) != self.max_lo + 1:
            raise AssertionError("the maxima columns are adjacent")
        # [A * W sums | A * 2 * world maxima slots | loss]: the one all-reduce of an evaluation.
        self.exchange = torch.zeros(A * W + 2 * A * world_size + 1, dtype=torch.float64, device=inner.home)
        self.rows = self.exchange[: A * W].view(A, W)
        self.slots = self.exchange[A * W : A * W + 2 * A * world_size].view(A, 2, world_size)
        self.loss = self.exchange[-1]
        self.top = torch.zeros(A, 2, dtype=torch.float64, device=inner.home)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["inner"], name)

    @property
    def scales(self) -> list[float]:
        return self.inner.scales

    @scales.setter
    def scales(self, values: list[float]) -> None:
        self.inner.scales = values

    @property
    def collective_bytes(self) -> dict[str, int]:
        """Bytes each rank puts into the collectives: ``reduce`` per evaluation, and
        ``gather`` per move (all arenas' slices, padded to the longest rank's)."""
        return {
            "reduce": self.exchange.numel() * self.exchange.element_size(),
            "gather": sum(a.send.numel() * a.send.element_size() for a in self.arenas) if self.world_size > 1 else 0,
        }

    # -- the passes -------------------------------------------------------------------
    def bind(self) -> None:
        self.inner.bind()

    def gradient_dots(self, *args, **kwargs) -> None:
        self.inner.gradient_dots(*args, **kwargs)

    def two_loop(self, loss: Tensor | None, pair: bool, direction: bool) -> None:
        if self.world_size == 1:
            self.inner.two_loop(loss, pair, direction)
            return
        rows, slots, lo = self.rows, self.slots, self.max_lo
        self.inner.local_rows(rows)
        slots.zero_()
        slots[:, :, self.rank].copy_(rows[:, lo : lo + 2])
        rows[:, lo : lo + 2].zero_()
        if loss is None:
            self.loss.zero_()
        else:
            self.loss.copy_(loss.reshape(()))
        dist.all_reduce(self.exchange, group=self.process_group)
        torch.amax(slots, -1, out=self.top)
        rows[:, lo : lo + 2].copy_(self.top)
        self.loss.div_(self.world_size)
        self.inner.two_loop(None if loss is None else self.loss, pair, direction, rows=rows)

    def push(self, source: int, alphas: list[float]) -> None:
        self.inner.push(source, alphas)

    def direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool,
                  push: bool) -> None:
        self.inner.direction(source, alphas, moves, save, push)
        if moves is not None:
            self.publish()

    def move(self, alphas: list[float], from_saved: bool) -> None:
        self.inner.move(alphas, from_saved)
        self.publish()

    def keep(self) -> None:
        self.inner.keep()

    def publish(self) -> None:
        """Every rank's updated slices into the full parameters (one all-gather per arena)."""
        for arena in self.arenas:
            arena.publish()
