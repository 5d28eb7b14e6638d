"""The fused backend: the mL-BFGS step as five Triton launches per arena.

Per step and arena (docs/design.md, "The fused backend"; the kernels are in
``mlbfgs_fused.kernels``), the passes of :class:`TritonPlan` in the order of
:func:`mlbfgs_fused.backends.run_passes`: ``gradient_dots``, pass 1 (``S g``, ``Y g``,
``g.g``, and on a pair-forming step the candidate pair's sums) and the coefficient
kernel (the two-loop on the Gram matrices, the pair's damping and acceptance, the
arena's finiteness probe); ``update``, pass 2 (direction, averages, momentum,
parameters); ``push`` (its programs return at once unless a pair is due); ``commit``
(counters and, after a push, the new Gram row; one program per block).
``variant="released"`` pushes the pair before the direction (E4): push, commit of the
pair, coefficients, pass 2, commit of the counters (seven launches).
Every decision that depends on a device value is taken on the device: the kernels
that write read the step's global verdict ``ok``. A steady-state step allocates
nothing and never reads a device value on the host.

Budget, float32 parameters and history, ``m`` slots, ``N`` elements, no weight
decay: pass 1 reads ``(8m + 4) N`` bytes, pass 2 reads ``(8m + 20) N`` and writes
``16 N``: ``(16m + 40) N`` a step; every ``T`` steps pass 1 adds ``28 N`` and the
push ``(8m + 32) N`` (``+ 8 N`` for the released variant). Per-element launches
run at most ``cap + B`` programs (``cap`` = 4 per SM, ``B`` blocks), each looping
over tiles of ``TILE`` elements; a block has at most ``cap`` partial rows, whatever
``N``, so every per-block reduction is bounded (two stages, fixed order).

The user's tensors, in place. The optimizer's own state is flat per arena, but the
parameters and gradients stay the user's tensors: the kernels reach them through an
address table (``data_ptr`` of each parameter and of its gradient), as torch's fused
AdamW takes tensor lists. The host compares the ``data_ptr``\\ s each step and uploads
the table again only when one changed (from pinned memory, asynchronously; during
CUDA graph capture, by fills baked into the graph). Each parameter's slice of the
flat state follows the parameter's memory order, so a channels_last parameter is
read and written as it lies. A gradient whose strides differ from its parameter's
is staged (copied into a buffer laid out like the parameter) before the kernels read
it; a parameter that is not dense (a strided slice) is stepped through a contiguous
copy, written back after the update. A parameter that changes dtype, device or memory format gets a new arena (the
optimizer rebuilds it, its state following) and so a new plan.

Each arena launches under its own device (``torch.cuda.device``) on that device's
current stream.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from .. import _checks
from .._math import NORMALIZE_NEVER, normalize_mode
from .._state.arena import Arena, is_dense, same_order, state_strides
from . import Plan, run_passes
from ._counter import CounterProbe
from ._fused import GroupGeometry, LearningRate, identity_blocks, pieces, ring_geometry

# Elements per tile; with Triton's default 4 warps no kernel spills registers.
# A block's (or parameter's) last tile is shorter.
TILE = 1024
# Workers (programs) per block at most: None is 4 per SM on a GPU, 4 in the interpreter.
WORKERS: int | None = None
PROGRAMS_PER_SM = 4

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


def worker_cap(device: torch.device) -> int:
    """Workers per block at most: a few programs per SM, so the grid and the number
    of partial rows per block are bounded by the machine, not by ``N``."""
    if WORKERS is not None:
        return WORKERS
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# -- entry points (see mlbfgs_fused.backends) --------------------------------------
def check_gradients(group: dict) -> None:
    _checks.check_gradients(group)


def plan(arenas: list[Arena], group: dict) -> TritonPlan:
    return TritonPlan(arenas)


def lbfgs_plan(arenas, gram, pair_count, maximize: bool, line_search: bool):
    """LBFGS's passes as Triton launches (:mod:`.lbfgs_triton`)."""
    from .lbfgs_triton import TritonLBFGSPlan

    return TritonLBFGSPlan(arenas, gram, pair_count, maximize, line_search)


# -- plans ------------------------------------------------------------------------
def plan_tables(layout, m: int, tile: int, cap: int):
    """The tile, worker and block tables of an arena layout (see
    :mod:`mlbfgs_fused.kernels.common`). Tiles lie in one block and one parameter;
    block ``b`` with ``T_b`` of the arena's ``T`` tiles gets
    ``min(T_b, max(1, ceil(cap * T_b / T)))`` workers: at most ``cap`` partial rows
    per block, at most ``cap + B`` programs per launch."""
    offsets = layout.param_offsets
    tiles, per_block = [], [0] * layout.num_blocks
    for start, end, b, i in pieces(layout, tile):
        tiles.append((start, end, i, start - offsets[i]))
        per_block[b] += 1
    total = max(1, len(tiles))
    workers, blocks = [], []
    first = 0
    for b, count in enumerate(per_block):
        lo, hi = layout.block_bounds[b], layout.block_bounds[b + 1]
        n = min(count, max(1, -(-cap * count // total))) if count else 1
        w0 = len(workers)
        for k in range(n):
            workers.append((b, first + k, first + count, n, *ring_geometry(layout, b, m)))
        blocks.append((lo, hi, w0, len(workers)))
        first += count
    return tiles, workers, blocks


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class TritonArena:
    """The fused backend's view of one arena: the address, tile, worker and block
    tables, and scratch for the partial sums. Built once."""

    def __init__(self, arena: Arena, group: TritonPlan, block_offset: int, tile: int, cap: int):
        m, dev = arena.m, arena.device
        self.arena, self.group, self.kernels = arena, group, group.kernels
        self.stats, self.hyper = group.geometry.stats[dev], group.hyper[dev]
        self.block_offset, self.tile = block_offset, tile
        self.guard = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
        # A parameter that is not dense (a strided slice) steps through a contiguous copy,
        # refreshed before the launches and written back after the update.
        self.copies = {
            i: torch.empty(p.shape, dtype=p.dtype, device=dev)
            for i, p in enumerate(arena.local_params()) if not is_dense(p)
        }
        tiles, workers, blocks = plan_tables(arena.layout, m, tile, cap)
        align = self.kernels.common.ALIGN
        # Aligned when every tile and ring starts at a multiple of ALIGN (and, checked as
        # the address table is built, every user tensor at a 16-byte boundary).
        self.tiles_aligned = all(x % align == 0 for row in tiles for x in row[:2] + row[3:]) and all(
            row[4] % align == 0 and row[5] % align == 0 for row in workers
        )
        self.aligned = False
        self.tiles = _table(tiles, 4, dev)
        self.workers = _table(workers, 6, dev)
        self.blocks = _table(blocks, 4, dev)
        self.addresses = torch.zeros(len(arena.params), 2, dtype=torch.int64, device=dev)
        self.param_ptrs: list[int] | None = None  # the user's pointers the table was built from
        self.grad_ptrs: list[int] | None = None
        self.staged: dict[int, Tensor] = {}  # gradients with other strides, copied each step
        self.has_grad = False

        # Scratch: per-worker partial sums (pass 1; the push for the Gram row), the
        # per-block coefficients of d and pair decision, the finiteness probe.
        def scratch(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=dev)

        self.dot_partials = scratch(len(workers), 2 * m + 1)
        self.pair_partials = scratch(len(workers), 3)
        self.gram_partials = scratch(len(workers), 4 * m)
        self.coef = scratch(arena.layout.num_blocks, 2 * m + 1)
        self.decision = scratch(arena.layout.num_blocks, 2)
        self.probe = scratch(())
        # What the coefficient and commit kernels add per block: the workers' partial
        # rows through the block table, or, for a rank that holds part of each block
        # (Arena.partial_blocks), per-block sums completed across ranks, one row each:
        # one buffer [pair sums B x 3 | dots B x (2m + 1) | Gram rows B x 4m], so that
        # what is completed together is contiguous.
        self.partial = arena.partial_blocks
        self.dots_in, self.pairs_in, self.grams_in, self.blocks_in = (
            self.dot_partials, self.pair_partials, self.gram_partials, self.blocks
        )
        if self.partial:
            B = arena.layout.num_blocks
            self.sums = scratch(B * (3 + 2 * m + 1 + 4 * m))
            self.pair_end, self.dots_end = 3 * B, 3 * B + B * (2 * m + 1)
            self.pairs_in = self.sums[: self.pair_end].view(B, 3)
            self.dots_in = self.sums[self.pair_end : self.dots_end].view(B, 2 * m + 1)
            self.grams_in = self.sums[self.dots_end :].view(B, 4 * m)
            self.blocks_in = identity_blocks(arena.layout, dev)
            self.counter_probe = CounterProbe(dev, wait=True)
            self.pair_possible = True

    # -- binding --------------------------------------------------------------
    def bind(self) -> bool:
        """Bring the address table up to date with the user's tensors (an upload only
        when a pointer changed); return whether any gradient is present."""
        params = self.arena.local_params()
        param_ptrs = list(map(_data_ptr, params))
        grads = self.arena.local_grads()
        grad_ptrs = [0 if g is None else g.data_ptr() for g in grads]
        if param_ptrs != self.param_ptrs or grad_ptrs != self.grad_ptrs:
            self._rebuild(params, grads, param_ptrs, grad_ptrs)
        elif self.staged:
            for i, stage in self.staged.items():
                stage.copy_(grads[i])
        for i, copy in self.copies.items():
            copy.copy_(params[i])
        return self.has_grad

    def write_back(self) -> None:
        """Parameters stepped through a copy receive their new values (after the update)."""
        if self.copies:
            params = self.arena.local_params()
            for i, copy in self.copies.items():
                params[i].copy_(copy)

    def _rebuild(self, params, grads, param_ptrs, grad_ptrs) -> None:
        device = self.arena.device
        staged: dict[int, Tensor] = {}
        table = []
        for i, (p, g) in enumerate(zip(params, grads)):
            address = 0
            order = state_strides(p)  # the arena's layout of the parameter (Arena.param_view)
            if g is not None:
                if same_order(p.shape, g.stride(), order):
                    address = g.data_ptr()
                else:  # staged into a buffer laid out like the parameter's state
                    stage = self.staged.get(i)
                    if stage is None:
                        stage = torch.empty_strided(p.shape, order, dtype=p.dtype, device=device)
                    stage.copy_(g)
                    staged[i] = stage
                    address = stage.data_ptr()
            table += (self.copies[i].data_ptr() if i in self.copies else p.data_ptr(), address)
        self.staged = staged
        if _capturing(device):
            # No host memory may be read in a captured graph: one fill per entry, its
            # value baked into the graph (the tensors captured there keep their addresses).
            for entry, address in zip(self.addresses.view(-1), table):
                entry.fill_(address)
        else:
            host = torch.tensor(table, dtype=torch.int64).view(-1, 2)
            if device.type == "cuda":
                host = host.pin_memory()  # the caching host allocator keeps it until the copy ran
            self.addresses.copy_(host, non_blocking=True)
        self.param_ptrs, self.grad_ptrs = param_ptrs, grad_ptrs
        self.has_grad = any(grad_ptrs)
        self.aligned = self.tiles_aligned and all(address % 16 == 0 for address in table)

    # -- launches ---------------------------------------------------------------
    def gradient_dots(self, group: dict, scale: Tensor | None) -> None:
        a, c, f = self.arena, self.arena.counters, self.arena.flat_state
        with self.guard:
            self.kernels.gradient_dots.gradient_dots(
                self.addresses, self.tiles, self.workers, a.history_s, a.history_y,
                f["param_ema"], f["grad_ema"], f["param_snapshot"], f["grad_snapshot"],
                c["step"], c["pair_count"], self.hyper, self.hyper if scale is None else scale,
                self.dot_partials, self.pair_partials, group["update_period"], a.m,
                group["weight_decay"] != 0, group["maximize"], scale is not None,
                group["variant"] == "released", self.tile, self.aligned,
            )

    def two_loop(self, group: dict, decide: bool = True, coefficients: bool = True) -> None:
        a, c = self.arena, self.arena.counters
        with self.guard:
            self.kernels.two_loop.two_loop(
                self.dots_in, self.pairs_in, self.blocks_in, a.gram, c["step"],
                c["pair_count"], self.hyper, self.coef, self.stats, self.decision, self.probe,
                self.block_offset, group["update_period"], a.m, decide, coefficients,
            )

    def update(self, group: dict, ok: Tensor, scale: Tensor | None) -> None:
        a, c, f = self.arena, self.arena.counters, self.arena.flat_state
        with self.guard:
            self.kernels.update.update(
                self.addresses, self.tiles, self.workers, a.history_s, a.history_y,
                f["param_ema"], f["grad_ema"], f["momentum_buffer"], self.coef, c["step"],
                self.group.d_scale[a.device], self.hyper, self.group.lr_on[a.device],
                self.hyper if scale is None else scale, ok, group["update_period"], a.m,
                group["weight_decay"] != 0, group["maximize"], scale is not None,
                group["variant"] == "released", self.tile, self.aligned,
            )

    def push(self, group: dict, ok: Tensor, scale: Tensor | None) -> None:
        a, c, f = self.arena, self.arena.counters, self.arena.flat_state
        with self.guard:
            self.kernels.push.push(
                f["param_ema"], f["grad_ema"], f["param_snapshot"], f["grad_snapshot"],
                a.history_s, a.history_y, self.tiles, self.workers, self.decision,
                self.gram_partials, self.hyper, c["step"], c["pair_count"], ok,
                self.addresses, self.hyper if scale is None else scale, self.dot_partials,
                group["update_period"], a.m, self.tile, self.aligned,
                group["variant"] == "released", group["weight_decay"] != 0, group["maximize"],
                scale is not None,
            )

    def commit(self, group: dict, ok: Tensor, pair: bool = True, counters: bool = True) -> None:
        a, c = self.arena, self.arena.counters
        with self.guard:
            self.kernels.push.commit(
                self.blocks_in, self.decision, self.grams_in, a.gram, c["step"],
                c["pair_count"], c["skipped_pairs"], c["skipped_steps"], ok,
                group["update_period"], a.m, pair, counters,
            )

    # -- a rank's part of each block (Arena.partial_blocks) -----------------------
    def complete_dots(self, group: dict) -> None:
        """Pass 1's per-block sums (with the candidate pair's where one can be due),
        completed by one ``block_sum``."""
        self.pair_possible = self.counter_probe.pair_update_possible(group["update_period"])
        with self.guard:
            self.kernels.two_loop.block_sums(self.dot_partials, self.blocks, self.dots_in)
            if self.pair_possible:
                self.kernels.two_loop.block_sums(self.pair_partials, self.blocks, self.pairs_in)
        self.arena.block_sum(self.sums[0 if self.pair_possible else self.pair_end : self.dots_end])

    def complete_push(self, group: dict) -> None:
        """After a push where a pair can be due: the new Gram rows' sums (and, under
        ``variant="released"``, the dots the push replaced), completed by one ``block_sum``."""
        if not self.pair_possible:
            return
        released = group["variant"] == "released"
        with self.guard:
            if released:
                self.kernels.two_loop.block_sums(self.dot_partials, self.blocks, self.dots_in)
            self.kernels.two_loop.block_sums(self.gram_partials, self.blocks, self.grams_in)
        self.arena.block_sum(self.sums[self.pair_end if released else self.dots_end :])


def _table(rows, columns: int, device) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64).view(-1, columns).to(device)


class TritonPlan(Plan):
    """The passes as Triton launches over one group's arenas, and what they share: the
    group's status rows (:class:`~._fused.GroupGeometry`), the hyperparameter vector
    and the learning rate (per device). Fused into neighbours: ``gradient_dots`` also
    launches the coefficient kernel (it decides the pair and writes the arena's
    finiteness probe) and, under ``variant="paper"``, finds the coefficients then too;
    the ``push`` of ``variant="released"`` forms this step's averages itself and
    replaces the pass-1 dots of the slot it writes, so its ``update(direction=False)``
    has nothing to do and its ``two_loop`` reads no vector again."""

    def __init__(self, arenas: list[Arena], tile: int | None = None):
        from ..kernels import common, gradient_dots, push, two_loop, update

        self.kernels = _Kernels(common, gradient_dots, two_loop, update, push)
        tile = TILE if tile is None else tile
        self.geometry = GroupGeometry(arenas)
        self.devices = self.geometry.devices
        self.hyper = {
            d: torch.zeros(common.NUM_HYPER, dtype=torch.float64, device=d) for d in self.devices
        }
        self.d_scale = {d: torch.ones((), dtype=torch.float64, device=d) for d in self.devices}
        self.guards = {
            d: torch.cuda.device(d) if d.type == "cuda" else contextlib.nullcontext()
            for d in self.devices
        }
        self.hyper_slots = {d: h.unbind(0) for d, h in self.hyper.items()}
        self.hyper_values: tuple | None = None
        self.lr = LearningRate(self.devices)
        self.lr_on: dict[torch.device, Tensor] = {}  # what the kernels read lr from
        self.scale_copies: dict[torch.device, Tensor] = {}  # AMP's scale on other devices
        self.arenas = [
            TritonArena(arena, self, offset, tile, worker_cap(arena.device))
            for arena, offset in zip(arenas, self.geometry.block_offsets)
        ]
        self.partial = [a for a in self.arenas if a.partial]  # distributed "sharded"

    @torch.compiler.disable  # host-side bookkeeping; the launches after it trace into one graph
    def prepare(self, group: dict) -> bool:
        """Refresh the hyperparameters and the address tables. Returns whether any
        parameter of the group has a gradient."""
        self._set_hyperparameters(group)
        self.lr_on = self.lr.refresh(group["lr"])
        present = [a.bind() for a in self.arenas]
        return any(present)

    def _set_hyperparameters(self, group: dict) -> None:
        """Refresh the device hyperparameter vectors where a value changed (a fill
        kernel each, no host-to-device copy)."""
        lr = group["lr"]
        beta_p, beta_g = group["ema_decay"]
        values = (
            0.0 if isinstance(lr, Tensor) else float(lr),
            group["momentum"], group["weight_decay"], 1 - beta_p, 1 - beta_g,
            group["pair_momentum"], group["damping"], group["sigma_low"], group["sigma_high"],
            group["eps"], beta_p, beta_g,
        )
        old = self.hyper_values
        if values != old:
            for d in self.devices:
                for i, (slot, value) in enumerate(zip(self.hyper_slots[d], values)):
                    if old is None or old[i] != value:
                        slot.fill_(value)
            self.hyper_values = values

    def _scales(self, amp) -> dict:
        """AMP's ``grad_scale`` per device (None when the gradients carry none)."""
        if amp is None or amp.grad_scale is None:
            return dict.fromkeys(self.devices)
        scale = amp.grad_scale
        out = {}
        for d in self.devices:
            if scale.device == d:
                out[d] = scale
            else:
                copy = self.scale_copies.get(d)
                if copy is None:
                    copy = self.scale_copies[d] = torch.empty((), dtype=scale.dtype, device=d)
                copy.copy_(scale.reshape(()), non_blocking=True)
                out[d] = copy
        return out

    def launch(self, group: dict, amp=None) -> None:
        """The step's launch sequence for this group alone (its own probes decide
        ``ok``): no host reads, no branch on a device value."""
        probes = self.gradient_dots(group, amp)
        ok = torch.stack([p.to(self.devices[0]) for p in probes]).sum().isfinite()
        run_passes(self, group, {d: ok.to(d) for d in self.devices}, amp)

    # -- the passes (each covers every arena before the next starts: the norm of d is group-wide)
    def gradient_dots(self, group: dict, amp) -> list[Tensor]:
        scales = self._scales(amp)
        for a in self.arenas:
            a.gradient_dots(group, scales[a.arena.device])
        for a in self.partial:
            a.complete_dots(group)
        # variant="released" uses a pair at the step it forms (E4): its coefficients
        # wait for the push.
        self._coefficients(group, decide=True, coefficients=group["variant"] == "paper")
        return [a.probe for a in self.arenas]

    def two_loop(self, group: dict, ok: dict, after_push: bool = False) -> None:
        if after_push:
            self._coefficients(group, decide=False, coefficients=True)
        elif self.geometry.partial_group:
            self._direction_scale(group)  # the group's totals, completed in this pass

    def _coefficients(self, group: dict, decide: bool, coefficients: bool) -> None:
        for a in self.arenas:
            a.two_loop(group, decide, coefficients)
        if coefficients and not (self.geometry.partial_group and decide):
            self._direction_scale(group)

    def _direction_scale(self, group: dict) -> None:
        self.geometry.share_stats([a.arena for a in self.arenas])
        mode = normalize_mode(group["normalize"])
        if self.geometry.partial_group and mode != NORMALIZE_NEVER:
            self.geometry.complete_group([a.arena for a in self.arenas])
        for d in self.devices:  # the group's scale of d, once per device
            with self.guards[d]:
                self.kernels.two_loop.direction_scale(self.geometry.scale_rows[d], self.d_scale[d], mode)

    def update(self, group: dict, ok: dict, amp, averages: bool = True, direction: bool = True) -> None:
        if not direction:
            return  # variant="released": the push kernel forms this step's averages
        scales = self._scales(amp)
        for a in self.arenas:
            a.update(group, ok[a.arena.device], scales[a.arena.device])
            a.write_back()

    def push(self, group: dict, ok: dict, amp) -> None:
        scales = self._scales(amp)
        for a in self.arenas:
            a.push(group, ok[a.arena.device], scales[a.arena.device])
        for a in self.partial:
            a.complete_push(group)
        if group["variant"] == "released":  # the pair, used at once (E4)
            for a in self.arenas:
                a.commit(group, ok[a.arena.device], pair=True, counters=False)

    def commit(self, group: dict, ok: dict) -> None:
        paper = group["variant"] == "paper"  # the released variant committed its pair already
        for a in self.arenas:
            a.commit(group, ok[a.arena.device], pair=paper, counters=True)
        for a in self.partial:
            a.counter_probe.record(a.arena.counters["step"][0])


class _Kernels:
    """The kernel modules, imported when the first plan is built (Triton is optional)."""

    def __init__(self, common, gradient_dots, two_loop, update, push):
        self.common, self.gradient_dots, self.two_loop = common, gradient_dots, two_loop
        self.update, self.push = update, push
