"""The fused backend: the mL-BFGS step as five Triton launches per arena.

Per step and arena (DESIGN.md section 3; the kernels are in ``mlbfgs_fused.kernels``):
pass 1 (``S g``, ``Y g``, ``g.g``), the coefficient kernel (the two-loop on the
Gram matrices), pass 2 (direction, EMAs, momentum, parameters), the pair push
(its programs return at once unless a pair is due) and the commit (counters and,
after a push, the new Gram row; one program per block). Every decision that depends on a device
value is taken on the device; ``step()`` allocates nothing and never reads a
device value on the host, so it can be captured in a CUDA graph.

Flat arenas. On first use each arena's parameters are re-pointed at slices of one
contiguous buffer (``param.data = view``, as FSDP's flat parameters do) and their
gradients become views of the arena's gradient buffer; autograd accumulates into
them in place and the optimizer's ``zero_grad`` zeroes them with one fill. A
gradient that was set to None and recreated, or replaced by another tensor, is
copied into the arena at the next step and the view re-bound (correct, only
slower); a parameter whose ``.data`` was replaced is gathered back likewise. The
steady-state check is an identity test per parameter done in C (``map``), not a
Python loop.
"""

from __future__ import annotations

import bisect
import functools
from operator import attrgetter, is_

import torch
from torch import Tensor

from .._checks import check_gradients  # an entry point; binding re-checks replaced gradients
from .._state.arena import Arena

# Elements per program; with Triton's default 4 warps no kernel spills registers.
# A block's (or parameter's) last program is shorter.
TILE = 1024

_grad_of = attrgetter("grad")
_data_ptr = Tensor.data_ptr


# -- support ----------------------------------------------------------------------
@functools.cache
def available() -> bool:
    """Whether Triton imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when they
    were defined): then they take CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction

    from ..kernels import gradient_dots

    return isinstance(gradient_dots.gradient_dots_kernel, InterpretedFunction)


def supported_devices() -> list[str]:
    return ["cuda", "cpu"] if available() and interpreting() else ["cuda"]


# -- entry points (see mlbfgs_fused.backends) --------------------------------------
@torch.compiler.disable  # host-side bookkeeping; the launches after it trace into one graph
def prepare(arenas: list[Arena], group: dict) -> bool:
    """Host-side work of a step, before any write: build the plan on first use, check
    and bind the gradients. Returns whether any parameter of the group has a gradient."""
    plan = arenas[0].fused
    if plan is None:
        plan = GroupPlan(arenas)
    return plan.prepare(group)


def gradient_dots(arenas: list[Arena], group: dict, amp) -> list[Tensor]:
    plan = arenas[0].fused
    plan.gradient_dots(group)
    plan.two_loop()
    return [p.stats[p.block_rows, 0].sum() for p in plan.arenas]


def finish(arenas: list[Arena], group: dict, ok: dict, amp) -> None:
    plan = arenas[0].fused
    plan.update(group)
    plan.push(group)
    plan.commit(group)


# -- plans ------------------------------------------------------------------------
class ArenaPlan:
    """The fused backend's view of one arena: flat parameter and gradient buffers,
    the program and block tables, and scratch for the partial sums. Built once."""

    def __init__(self, arena: Arena, group: GroupPlan, block_offset: int, tile: int):
        n, m, dev = arena.layout.numel, arena.m, arena.device
        self.arena, self.group, self.kernels = arena, group, group.kernels
        self.stats, self.hyper = group.stats[dev], group.hyper[dev]
        self.block_offset, self.tile = block_offset, tile
        count = len(arena.params)

        self.param_flat = torch.empty(n, dtype=arena.dtype, device=dev)
        self.param_views = [arena.param_view(self.param_flat, i) for i in range(count)]
        self.grad_views = [arena.param_view(arena.grad_flat, i) for i in range(count)]
        with torch.no_grad():
            for p, view in zip(arena.params, self.param_views):
                view.copy_(p)
                p.data = view
        self.param_ptrs = list(map(_data_ptr, arena.params))

        programs, blocks = program_tables(arena.layout, m, tile)
        self.programs = torch.tensor(programs, dtype=torch.int64, device=dev)
        self.blocks = torch.tensor(blocks, dtype=torch.int64, device=dev)
        self.present = torch.ones(count, dtype=torch.int32, device=dev)
        self.all_present = (True,) * count
        self.present_pattern = self.all_present
        # Scratch: per-program partial sums (pass 1; pass 2 for the damping; the push
        # for the Gram row) and per-block coefficients of d.
        def scratch(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=dev)

        self.dot_partials = scratch(len(programs), 2 * m + 1)
        self.pair_partials = scratch(len(programs), 3)
        self.gram_partials = scratch(len(programs), 4 * m)
        self.coef = scratch(arena.layout.num_blocks, 2 * m + 1)

    @property
    def block_rows(self) -> slice:
        return slice(self.block_offset, self.block_offset + self.arena.layout.num_blocks)

    # -- binding --------------------------------------------------------------
    def bind(self) -> bool:
        """Make every parameter a view of the arena and every gradient a view of
        its gradient buffer; return whether any gradient is present."""
        params = self.arena.params
        if list(map(_data_ptr, params)) != self.param_ptrs:
            self._gather_params()
        if all(map(is_, map(_grad_of, params), self.grad_views)):
            self._set_present(self.all_present)
            return True
        return self._gather_grads()

    def _gather_params(self) -> None:
        with torch.no_grad():
            for p, view in zip(self.arena.params, self.param_views):
                if p.data_ptr() == view.data_ptr():
                    continue
                if p.shape != view.shape or p.dtype != view.dtype or p.device != view.device:
                    raise RuntimeError(
                        "a parameter changed shape, dtype or device after the optimizer first "
                        "stepped it; build a new optimizer"
                    )
                view.copy_(p)
                p.data = view
        self.param_ptrs = list(map(_data_ptr, self.arena.params))

    def _gather_grads(self) -> bool:
        params = self.arena.params
        grads = list(map(_grad_of, params))
        foreign = [
            p for p, g, v in zip(params, grads, self.grad_views) if g is not None and g is not v
        ]
        check_gradients({"params": foreign})
        with torch.no_grad():
            for p, g, view in zip(params, grads, self.grad_views):
                if g is not None and g is not view:
                    view.copy_(g)
                    p.grad = view
        pattern = tuple(g is not None for g in grads)
        self._set_present(pattern)
        return any(pattern)

    def _set_present(self, pattern: tuple[bool, ...]) -> None:
        """Update the device flags of which parameters have a gradient, only when
        they change (a host-to-device copy)."""
        if pattern is not self.present_pattern and pattern != self.present_pattern:
            self.present.copy_(torch.tensor(pattern, dtype=torch.int32))
            self.present_pattern = pattern

    def zero_grad(self) -> list[Tensor]:
        """Zero the gradient buffer in place; return the parameters left with nothing
        to reset (a gradient that is a view of the buffer, or None)."""
        self.arena.grad_flat.zero_()
        params = self.arena.params
        if all(map(is_, map(_grad_of, params), self.grad_views)):
            return params
        return [p for p, v in zip(params, self.grad_views) if p.grad is None or p.grad is v]

    # -- launches ---------------------------------------------------------------
    def gradient_dots(self, group: dict) -> None:
        a = self.arena
        self.kernels.gradient_dots.gradient_dots(
            a.grad_flat, self.param_flat, a.history_s, a.history_y, self.programs, self.present,
            self.hyper, self.dot_partials, a.m, group["weight_decay"] != 0, group["maximize"],
            self.tile,
        )

    def two_loop(self) -> None:
        a = self.arena
        self.kernels.two_loop.two_loop(
            self.dot_partials, self.blocks, a.gram, a.counters["pair_count"], self.coef,
            self.stats, self.block_offset, a.m,
        )

    def update(self, group: dict) -> None:
        a = self.arena
        f, c = a.flat_state, a.counters
        self.kernels.update.update(
            a.grad_flat, self.param_flat, a.history_s, a.history_y,
            f["param_ema"], f["grad_ema"], f["momentum_buffer"], f["param_snapshot"],
            f["grad_snapshot"], self.programs, self.present, self.coef, c["step"],
            c["pair_count"], self.stats, self.hyper, self.group.lr[a.device], self.pair_partials,
            group["update_period"], a.m, group["weight_decay"] != 0, group["maximize"],
            group["normalize"], self.tile,
        )

    def push(self, group: dict) -> None:
        a = self.arena
        f, c = a.flat_state, a.counters
        self.kernels.push.push(
            f["param_ema"], f["grad_ema"], f["param_snapshot"], f["grad_snapshot"],
            a.history_s, a.history_y, self.programs, self.blocks, self.stats,
            self.pair_partials, self.gram_partials, self.hyper, c["step"], c["pair_count"],
            group["update_period"], a.m, self.tile,
        )

    def commit(self, group: dict) -> None:
        a = self.arena
        c = a.counters
        self.kernels.push.commit(
            self.blocks, self.stats, self.pair_partials, self.gram_partials, self.hyper, a.gram,
            c["step"], c["pair_count"], c["skipped_pairs"], c["skipped_steps"],
            group["update_period"], a.m,
        )


class GroupPlan:
    """The plans of one parameter group's arenas, and what they share: the group-wide
    stats rows (one copy per device) and the hyperparameter vector (per device)."""

    def __init__(self, arenas: list[Arena], tile: int | None = None):
        from ..kernels import common, gradient_dots, push, two_loop, update

        self.kernels = _Kernels(common, gradient_dots, two_loop, update, push)
        tile = TILE if tile is None else tile
        self.devices = list(dict.fromkeys(a.device for a in arenas))
        total = sum(a.layout.num_blocks for a in arenas)
        self.stats = {
            d: torch.zeros(total, common.STATS_COLUMNS, dtype=torch.float64, device=d)
            for d in self.devices
        }
        self.hyper = {
            d: torch.zeros(common.NUM_HYPER, dtype=torch.float64, device=d) for d in self.devices
        }
        self.hyper_slots = {d: h.unbind(0) for d, h in self.hyper.items()}
        self.hyper_values: tuple | None = None
        self.lr_slot = {d: slots[common.H_LR] for d, slots in self.hyper_slots.items()}
        self.lr_source: float | Tensor | None = None
        self.lr: dict[torch.device, Tensor] = {}  # what the kernels read lr from
        self.arenas = []
        offset = 0
        for arena in arenas:
            self.arenas.append(ArenaPlan(arena, self, offset, tile))
            offset += arena.layout.num_blocks
        for arena in arenas:
            arena.fused = self

    def prepare(self, group: dict) -> bool:
        self._set_hyperparameters(group)
        present = [plan.bind() for plan in self.arenas]
        return any(present)

    def _set_hyperparameters(self, group: dict) -> None:
        """Refresh the device hyperparameter vectors where a value changed (a fill
        kernel each, no host-to-device copy), and point the kernels' ``lr`` at a
        tensor lr itself when it lives on the arena's device."""
        lr = group["lr"]
        beta_p, beta_g = group["ema_decay"]
        values = (
            0.0 if isinstance(lr, Tensor) else float(lr),
            group["momentum"], group["weight_decay"], 1 - beta_p, 1 - beta_g,
            group["pair_momentum"], group["damping"], group["sigma_low"], group["sigma_high"],
            group["eps"],
        )
        old = self.hyper_values
        if values != old:
            for d in self.devices:
                for i, (slot, value) in enumerate(zip(self.hyper_slots[d], values)):
                    if old is None or old[i] != value:
                        slot.fill_(value)
            self.hyper_values = values
        is_tensor = isinstance(lr, Tensor)
        if lr is not self.lr_source:  # a new lr object: views are made once, not per step
            self.lr_source = lr
            self.lr = {
                d: lr.view(()) if is_tensor and lr.device == d else self.lr_slot[d]
                for d in self.devices
            }
        if is_tensor:
            for d in self.devices:
                if lr.device != d:  # a tensor lr elsewhere (say on the CPU): copy its value
                    slot = self.lr_slot[d]
                    slot.fill_(lr.item()) if lr.device.type == "cpu" else slot.copy_(lr)

    def launch(self, group: dict) -> None:
        """The step's launch sequence: no host reads, no allocation, no branch on a
        device value. Each pass covers every arena before the next starts, since the
        finiteness and the norm of ``d`` are group-wide. The passes are also callable
        one by one (the benchmarks time them so)."""
        self.gradient_dots(group)
        self.two_loop()
        self.update(group)
        self.push(group)
        self.commit(group)

    def gradient_dots(self, group: dict) -> None:
        for plan in self.arenas:
            plan.gradient_dots(group)

    def two_loop(self) -> None:
        for plan in self.arenas:
            plan.two_loop()
        if len(self.devices) > 1:
            self._share_stats()

    def update(self, group: dict) -> None:
        for plan in self.arenas:
            plan.update(group)

    def push(self, group: dict) -> None:
        for plan in self.arenas:
            plan.push(group)

    def commit(self, group: dict) -> None:
        for plan in self.arenas:
            plan.commit(group)

    def _share_stats(self) -> None:
        """A group spread over devices: each device gets every arena's stats rows."""
        for plan in self.arenas:
            rows = plan.block_rows
            for d in self.devices:
                if d != plan.arena.device:
                    self.stats[d][rows].copy_(plan.stats[rows], non_blocking=True)

    def zero_grad(self) -> list[Tensor]:
        return [p for plan in self.arenas for p in plan.zero_grad()]


class _Kernels:
    """The kernel modules, imported when the first plan is built (Triton is optional)."""

    def __init__(self, common, gradient_dots, two_loop, update, push):
        self.common, self.gradient_dots, self.two_loop = common, gradient_dots, two_loop
        self.update, self.push = update, push


def program_tables(layout, m: int, tile: int) -> tuple[list[list[int]], list[list[int]]]:
    """The program table (tiles within one block and one parameter) and the block
    table of an arena layout; see :mod:`mlbfgs_fused.kernels.common`."""
    offsets = list(layout.param_offsets)
    programs, blocks = [], []
    for b in range(layout.num_blocks):
        lo, hi = layout.block_bounds[b], layout.block_bounds[b + 1]
        first = len(programs)
        cuts = sorted({lo, hi, *(o for o in offsets if lo < o < hi)})
        for a, z in zip(cuts[:-1], cuts[1:]):
            param = bisect.bisect_right(offsets, a) - 1
            for start in range(a, z, tile):
                programs.append([start, min(start + tile, z), b, param, m * lo - lo, hi - lo])
        if len(programs) == first:  # an empty block still needs a program for its counters
            param = max(0, bisect.bisect_right(offsets, lo) - 1)
            programs.append([lo, lo, b, param, m * lo - lo, hi - lo])
        blocks.append([lo, hi, first, len(programs)])
    return programs, blocks
