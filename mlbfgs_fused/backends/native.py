"""The native backends: the mL-BFGS step as C++ ops (``"cpp"``) and CUDA C++ ops (``"cuda"``).

Both call the same four ops, ``torch.ops.mlbfgs_fused_native.{gradient_dots, two_loop,
update, push}`` (schemas in ``csrc/ops.cpp``), registered per device: ``csrc/cpu/``
(``at::parallel_for`` over fixed chunks, ``at::vec::Vectorized``) and ``csrc/cuda/``.
They read and write the user's parameters and gradients in place (a list of
tensors, as torch's fused AdamW takes them) and the arena's flat state, so
``optimizer.state`` and checkpoints are those of every other backend. The ops
allocate nothing; every scratch buffer (per-chunk partial sums, coefficients, the
group's status rows) is made once per group by :class:`NativePlan`.

The C++ extension ``mlbfgs_fused._C`` is built by ``setup.py``; where it was not
built the backends report themselves unavailable.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import Tensor

from .._checks import check_gradients as _check_gradients
from .._math import NORMALIZE_NEVER, normalize_mode
from .._state.arena import Arena, is_dense
from . import Plan
from ._counter import CounterProbe
from ._fused import GroupGeometry, LearningRate, identity_blocks, pieces, ring_geometry

# Elements per chunk: csrc/ops.h CHUNK. Chunks never depend on the thread count, so
# reductions (added per chunk, then in chunk order) are reproducible to the bit.
CHUNK = 4096
CHUNK_COLUMNS = 7  # start, end, block, param, param_start, ring_origin, ring_stride
PAIR_COLUMNS = 3  # s.s, s.y, y.y
# What an update pass does (csrc/ops.h UpdateMode).
(UPDATE_PAPER, UPDATE_RELEASED, UPDATE_RELEASED_AVERAGES, UPDATE_RELEASED_AFTER_PUSH,
 UPDATE_PAPER_PAIR) = range(5)

def load_error() -> str | None:
    """Why the C++ ops are not loaded, or None when they are. Ops already registered
    (the CMake library loaded with ``torch.ops.load_library``) are used as they are.
    Found once per process; afterwards a module global, which ``torch.compile`` reads
    as a constant."""
    global _LOAD_ERROR
    if _LOAD_ERROR is _UNKNOWN:
        _LOAD_ERROR = _find_load_error()
    return _LOAD_ERROR


_UNKNOWN = object()
_LOAD_ERROR: str | None | object = _UNKNOWN


@torch.compiler.disable
def _find_load_error() -> str | None:
    if not _registered("CPU"):
        try:
            from .. import _C  # noqa: F401 -- registers torch.ops.mlbfgs_fused_native
        except ImportError as error:
            return f"the C++ extension mlbfgs_fused._C is not built ({error})"
    _register_fakes()
    return None


def _registered(dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(
            "mlbfgs_fused_native::update", dispatch_key
        )
    except RuntimeError:  # no such op
        return False


def ops():
    return torch.ops.mlbfgs_fused_native


def _whole_step_binding():
    """``_C.whole_step_plan`` and ``_C.whole_step`` (csrc/python.cpp), or Nones where the
    extension is not built, or where the ops came from a library loaded without them
    (CMake's): importing the extension then would register the ops a second time."""
    if _registered("CPU") and f"{__package__.rpartition('.')[0]}._C" not in sys.modules:
        return None, None
    try:
        from .. import _C
    except ImportError:
        return None, None
    return getattr(_C, "whole_step_plan", None), getattr(_C, "whole_step", None)


_whole_step_plan, _whole_step = _whole_step_binding()


def _register_fakes() -> None:
    """Every op only writes into its arguments: the fake kernels do nothing, so
    ``torch.compile`` traces through the step."""
    for name in ("gradient_dots", "two_loop", "update", "push", "push_pairs", "commit", "block_sums"):
        torch.library.register_fake(f"mlbfgs_fused_native::{name}")(_no_op)


def _no_op(*args, **kwargs) -> None:
    return None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registered CUDA kernels."""
    return load_error() is None and _registered("CUDA")


class NativeBackend:
    """The entry points of mlbfgs_fused.backends for one device type."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device

    def available(self) -> bool:
        if self.device == "cuda":
            return has_cuda_kernels() and torch.cuda.is_available()
        return load_error() is None

    def unavailable_reason(self) -> str | None:
        if load_error() is not None:
            return load_error()
        if self.device == "cuda" and not self.available():
            return "the C++ extension has no CUDA kernels or no GPU is visible"
        return None

    def supported_devices(self) -> list[str]:
        return [self.device]

    def check_gradients(self, group: dict) -> None:
        if self.device == "cuda" and torch.cuda.is_current_stream_capturing():
            # Each CUDA op uploads its pointer table from a pinned host buffer it frees on
            # return: a captured copy would read freed memory on every replay.
            raise RuntimeError(
                "the 'cuda' backend cannot be captured in a CUDA graph; use backend='triton' "
                "(fused=True picks it when Triton is installed)"
            )
        _check_gradients(group)
        if group["variant"] != "paper" and self.device != "cpu":
            raise NotImplementedError(
                f"variant={group['variant']!r} is not implemented on the {self.name!r} backend; "
                "use backend='foreach'"
            )

    def plan(self, arenas: list[Arena], group: dict) -> NativePlan:
        return NativePlan(arenas)

    def lbfgs_plan(self, arenas, gram, pair_count, maximize: bool, line_search: bool):
        """LBFGS's passes as the ``lbfgs_*`` ops (:mod:`.lbfgs_native`)."""
        from .lbfgs_native import NativeLBFGSPlan

        return NativeLBFGSPlan(arenas, gram, pair_count, maximize, line_search)


cpp = NativeBackend("cpp", "cpu")
cuda = NativeBackend("cuda", "cuda")


class NativePlan(Plan):
    """The passes as the C++ ops run them. Fused into neighbours: ``gradient_dots`` runs
    the ``two_loop`` op too (it writes the arena's finiteness probe), and ``push`` the
    counters (so ``commit`` has nothing left). On the CPU (``variant="paper"``) pass 1
    also sums a pair-forming step's candidate, and the ``update`` op decides its damping
    and pushes it (the ring slot, the Gram row from the ring rows it reads anyway, the
    snapshots), so ``push`` reads nothing per element; on CUDA ``push`` is the pair's own
    pass. Under ``variant="released"`` a step that forms no pair updates the averages
    and the direction in one pass, the first; a due one in two, around the push, which
    is followed by a second pass 1 for the dots and coefficients with the new pair (E4).

    Arenas that hold part of their blocks' elements (``Arena.partial_blocks``, a
    distributed rank) add each block's partial rows with the ``block_sums`` op and
    complete them with ``Arena.block_sum`` before ``two_loop`` reads them, and run
    ``push`` as ``push_pairs`` and ``commit`` with the pair's sums and the Gram rows
    completed in between (on the steps where a pair can be due): there the CPU sums the
    candidate in the update pass and pushes the pair by its own pass, as CUDA does. Where
    the group's blocks lie on several ranks (``Arena.partial_group``), the update that
    writes ``d`` completes the group's scale of ``d`` first. Otherwise every reduction
    stays inside the ops.

    Where the group is the optimizer's only arena and on the CPU, :meth:`whole_step`
    runs all of it as one C++ call (``mlbfgs_fused._C.whole_step``, csrc/python.cpp)."""

    def __init__(self, arenas: list[Arena]):
        self.geometry = GroupGeometry(arenas)
        self.devices = self.geometry.devices
        self.lr = LearningRate(self.devices, torch.float64)  # the CUDA op reads a double
        self.arenas = [
            NativeArena(arena, self.geometry, offset)
            for arena, offset in zip(arenas, self.geometry.block_offsets)
        ]
        self.released_due = False
        self.single_call = len(self.arenas) == 1 and self.arenas[0].whole is not None

    def prepare(self, group: dict) -> bool:
        self.lr_on = self.lr.refresh(group["lr"])
        return any(p.grad is not None for p in group["params"])

    def whole_step(self, group: dict, amp) -> bool:
        if not self.single_call or group["variant"] != "paper":
            return False
        grad_scale = found_inf = None
        if amp is not None:
            grad_scale, found_inf = amp.grad_scale, amp.found_inf
        return _whole_step(
            self.arenas[0].whole, group["params"], group["lr"], group["momentum"], group["weight_decay"],
            group["ema_decay"], group["pair_momentum"], group["damping"], group["sigma_low"],
            group["sigma_high"], group["eps"], group["update_period"], group["maximize"],
            normalize_mode(group["normalize"]), grad_scale, found_inf,
        )

    def gradient_dots(self, group: dict, amp) -> list[Tensor]:
        grad_scale = None if amp is None else amp.grad_scale
        for a in self.arenas:
            a.gradient_dots(group, grad_scale)
        self.geometry.share_stats([a.arena for a in self.arenas])
        return [a.probe for a in self.arenas]

    def two_loop(self, group: dict, ok: dict, after_push: bool = False) -> None:
        pass  # with gradient_dots (and after a released push, with push)

    def update(self, group: dict, ok: dict, amp, averages: bool = True, direction: bool = True) -> None:
        if group["variant"] == "paper":
            mode = None  # each arena's own: the pair pushed here on the CPU
        elif not direction:
            # Every block of a group steps together; on the CPU the counter is host memory.
            self.released_due = (int(self.arenas[0].arena.counters["step"][0]) + 1) % group["update_period"] == 0
            # No pair due: the direction is that of pass 1's dots, and the push only counts
            # (the op reads the counter as it was): the whole pass now.
            mode = UPDATE_RELEASED_AVERAGES if self.released_due else UPDATE_RELEASED
        elif self.released_due:
            mode = UPDATE_RELEASED_AFTER_PUSH
        else:
            return  # done with the averages
        if mode != UPDATE_RELEASED_AVERAGES and self.geometry.partial_group:
            # The one pass of the step that writes d: the group's scale of d, completed.
            if normalize_mode(group["normalize"]) != NORMALIZE_NEVER:
                self.geometry.complete_group([a.arena for a in self.arenas])
        grad_scale = None if amp is None else amp.grad_scale
        for a in self.arenas:
            a.update(group, ok[a.arena.device], grad_scale, self.lr_on[a.arena.device],
                     a.paper_mode if mode is None else mode)

    def push(self, group: dict, ok: dict, amp) -> None:
        for a in self.arenas:
            a.push(group, ok[a.arena.device])
        if group["variant"] == "released" and self.released_due:
            self.gradient_dots(group, amp)  # the dots and coefficients with the new pair

    def commit(self, group: dict, ok: dict) -> None:
        pass  # the push op counted


class NativeArena:
    """One arena's tables and scratch, built once."""

    def __init__(self, arena: Arena, geometry: GroupGeometry, block_offset: int):
        self.arena, self.block_offset = arena, block_offset
        m, dev = arena.m, arena.device
        self.stats = geometry.stats[dev]  # two_loop writes the blocks' status rows
        self.scale_rows = geometry.scale_rows[dev]  # update finds the scale of d there
        chunks, blocks = chunk_tables(arena.layout, m)
        self.chunks = torch.tensor(chunks, dtype=torch.int64, device=dev).view(-1, CHUNK_COLUMNS)
        self.blocks = torch.tensor(blocks, dtype=torch.int64, device=dev).view(-1, 4)

        def scratch(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=dev)

        P, B = self.chunks.shape[0], arena.layout.num_blocks
        self.partials = scratch(P, 2 * m + 1)
        self.pair_partials = scratch(P, PAIR_COLUMNS)
        self.gram_partials = scratch(P, 4 * m)
        self.coef = scratch(B, 2 * m + 1)
        self.probe = scratch(())
        # A distributed rank may hold none of the arena's elements (its blocks are there).
        self.holds_elements = bool(arena.params)
        self.partial = arena.partial_blocks
        if self.partial:  # per-block sums, completed across ranks, and their block table
            self.rows = identity_blocks(arena.layout, dev)
            self.dot_sums = scratch(B, 2 * m + 1)
            self.pair_sums = scratch(B, PAIR_COLUMNS)
            self.gram_sums = scratch(B, 4 * m)
            self.counter_probe = CounterProbe(dev, wait=True)
        self.params = arena.params
        # The CPU pushes a pair inside pass 2 (its sums from pass 1); CUDA, and a rank
        # holding part of each block (whose sums are completed across ranks), by its own pass.
        self.fused_pair = dev.type == "cpu" and not self.partial
        self.paper_mode = UPDATE_PAPER_PAIR if self.fused_pair else UPDATE_PAPER
        self.whole = self._whole_step_plan() if self.fused_pair else None

    def _whole_step_plan(self):
        """The plan of ``_C.whole_step`` (csrc/python.cpp): the parameters as the group
        lists them and the arena's order of them, the state and scratch; None where the
        arena is a piece of a group's parameters (a distributed rank) or a parameter is
        not dense (stepped through a copy)."""
        a = self.arena
        if _whole_step is None or type(a).local_param is not Arena.local_param:
            return None
        if not all(is_dense(p) for p in self.params):
            return None
        order = list(a.layout.order)
        group_params = [None] * len(order)
        for position, i in enumerate(order):
            group_params[i] = self.params[position]
        f, c = a.flat_state, a.counters
        state = (
            a.history_s, a.history_y, f["param_ema"], f["grad_ema"], f["momentum_buffer"],
            f["param_snapshot"], f["grad_snapshot"], a.gram, c["step"], c["pair_count"],
            c["skipped_pairs"], c["skipped_steps"], self.chunks, self.blocks, self.partials,
            self.pair_partials, self.gram_partials, self.coef, self.stats,
        )
        return _whole_step_plan(group_params, order, state, a.m)

    def _tensors(self):
        """The parameters and gradients as the ops take them: contiguous, in the
        arena's element order. A dense parameter in another memory order (channels_last,
        a transpose) is passed as a flat view of its memory, which is the arena's order
        for it (``Arena.param_view``), with its gradient in the same order (staged when
        its strides differ); any other layout is stepped through a contiguous copy.
        Returns ``(params, grads, staged)``; ``staged`` pairs copies to write back."""
        params = self.arena.local_params()
        grads = self.arena.local_grads()
        if all(map(Tensor.is_contiguous, params)) and all(g is None or g.is_contiguous() for g in grads):
            return params, grads, None
        out_params, out_grads, staged = [], [], []
        for p, g in zip(params, grads):
            if p.is_contiguous():
                out_params.append(p)
                out_grads.append(g if g is None or g.is_contiguous() else g.contiguous())
            elif is_dense(p):
                out_params.append(_memory_order(p))
                if g is not None and g.stride() != p.stride():
                    g = torch.empty_like(p).copy_(g)  # the parameter's strides
                out_grads.append(None if g is None else _memory_order(g))
            else:
                copy = p.contiguous()
                staged.append((p, copy))
                out_params.append(copy)
                out_grads.append(None if g is None else g.contiguous())
        return out_params, out_grads, staged or None
    def gradient_dots(self, group: dict, grad_scale: Tensor | None) -> None:
        a = self.arena
        if self.holds_elements:
            f, c = a.flat_state, a.counters
            beta_p, beta_g = group["ema_decay"]
            params, grads, _ = self._tensors()
            ops().gradient_dots(
                params, grads, a.history_s, a.history_y, f["param_ema"], f["grad_ema"],
                f["param_snapshot"], f["grad_snapshot"], self.chunks, c["step"], c["pair_count"],
                self.partials, self.pair_partials, grad_scale, group["weight_decay"], group["maximize"],
                beta_p, beta_g, group["pair_momentum"], group["update_period"], a.m,
                self.fused_pair and group["variant"] == "paper",
            )
        partials, blocks = self.partials, self.blocks
        if self.partial:
            partials, blocks = self.complete(self.partials, self.dot_sums), self.rows
        ops().two_loop(
            partials, blocks, a.gram, a.counters["pair_count"], self.coef, self.stats,
            self.probe, self.block_offset, a.m,
        )

    def update(self, group: dict, ok: Tensor, grad_scale: Tensor | None, lr: Tensor, mode: int = 0) -> None:
        if not self.holds_elements:
            return
        a = self.arena
        f, c = a.flat_state, a.counters
        beta_p, beta_g = group["ema_decay"]
        params, grads, staged = self._tensors()
        ops().update(
            params, grads, a.history_s, a.history_y, f["param_ema"], f["grad_ema"],
            f["momentum_buffer"], f["param_snapshot"], f["grad_snapshot"], self.chunks,
            self.blocks, self.coef, c["step"], c["pair_count"], self.scale_rows, ok, grad_scale,
            self.pair_partials, self.gram_partials, lr, group["momentum"],
            group["weight_decay"], beta_p, beta_g, group["pair_momentum"], group["damping"],
            group["sigma_low"], group["sigma_high"], group["eps"], group["update_period"], a.m,
            group["maximize"], normalize_mode(group["normalize"]), mode,
        )
        if staged is not None:
            for p, copy in staged:
                p.copy_(copy)

    def push(self, group: dict, ok: Tensor) -> None:
        a = self.arena
        f, c = a.flat_state, a.counters
        hyper = (group["damping"], group["sigma_low"], group["sigma_high"], group["eps"], group["update_period"], a.m)
        if not self.partial:
            ops().push(
                f["param_ema"], f["grad_ema"], f["param_snapshot"], f["grad_snapshot"],
                a.history_s, a.history_y, a.gram, self.chunks, self.blocks, self.pair_partials,
                self.gram_partials, ok, c["step"], c["pair_count"], c["skipped_pairs"],
                c["skipped_steps"], group["pair_momentum"], *hyper,
                self.fused_pair and group["variant"] == "paper",
            )
            return
        # A rank's part of each block: the pair's sums are completed before the pair is
        # decided and written, its Gram rows before they are committed. Where no pair can
        # be due only the counters move (every rank knows the same, CounterProbe).
        if self.counter_probe.pair_update_possible(group["update_period"]):
            pair_sums = self.complete(self.pair_partials, self.pair_sums)
            if self.holds_elements:
                ops().push_pairs(
                    f["param_ema"], f["grad_ema"], f["param_snapshot"], f["grad_snapshot"],
                    a.history_s, a.history_y, self.chunks, self.rows, pair_sums,
                    self.gram_partials, ok, c["step"], c["pair_count"], group["pair_momentum"], *hyper,
                )
            self.complete(self.gram_partials, self.gram_sums)
        ops().commit(
            a.gram, self.rows, self.pair_sums, self.gram_sums, ok, c["step"], c["pair_count"],
            c["skipped_pairs"], c["skipped_steps"], *hyper,
        )
        self.counter_probe.record(c["step"][0])

    def complete(self, partials: Tensor, sums: Tensor) -> Tensor:
        """The per-block sums of a partial-sum matrix (rows in chunk order, as the ops add
        them), completed by the arena's ``block_sum`` (one all-reduce on a distributed
        rank); the ops read them back through ``self.rows``."""
        ops().block_sums(partials, self.blocks, sums)
        return self.arena.block_sum(sums)


def _memory_order(t: Tensor) -> Tensor:
    """A dense tensor's elements as a 1-D view, in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def chunk_tables(layout, m: int) -> tuple[list[int], list[int]]:
    """The chunk table and block table of an arena layout, flattened (csrc/ops.h)."""
    offsets = layout.param_offsets
    chunks: list[int] = []
    per_block = [0] * layout.num_blocks
    for start, end, b, i in pieces(layout, CHUNK):
        chunks += [start, end, b, i, offsets[i], *ring_geometry(layout, b, m)]
        per_block[b] += 1
    blocks: list[int] = []
    count = 0
    for b in range(layout.num_blocks):
        blocks += [layout.block_bounds[b], layout.block_bounds[b + 1], count, count + per_block[b]]
        count += per_block[b]
    return chunks, blocks