"""The native backends: the mL-BFGS step as C++ ops (``"cpp"``) and CUDA C++ ops (``"cuda"``).

Both call the same four ops, ``torch.ops.mlbfgs_fused_native.{gradient_dots, two_loop,
update, push}`` (schemas in ``csrc/ops.cpp``), registered per device: ``csrc/cpu/``
(``at::parallel_for`` over fixed chunks, ``at::vec::Vectorized``) and ``csrc/cuda/``.
They read and write the user's parameters and gradients in place (a list of
tensors, as torch's fused AdamW takes them) and the arena's flat state, so
``optimizer.state`` and checkpoints are those of every other backend. The ops
allocate nothing; every scratch buffer (per-chunk partial sums, coefficients, the
group's status rows) is made once per arena by :class:`GroupPlan`.

The C++ extension ``mlbfgs_fused._C`` is built by ``setup.py``; where it was not
built the backends report themselves unavailable.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .._checks import check_gradients as _check_gradients
from .._math import normalize_mode
from .._state.arena import Arena, is_dense

# Elements per chunk: csrc/ops.h CHUNK. Chunks never depend on the thread count, so
# reductions (added per chunk, then in chunk order) are reproducible to the bit.
CHUNK = 4096
CHUNK_COLUMNS = 7  # start, end, block, param, param_start, ring_origin, ring_stride
STATS_COLUMNS = 3  # g.g, ||d||^2, any pair held
PAIR_COLUMNS = 3  # s.s, s.y, y.y
# What an update pass does (csrc/ops.h UpdateMode).
UPDATE_PAPER, UPDATE_RELEASED, UPDATE_RELEASED_AVERAGES, UPDATE_RELEASED_AFTER_PUSH = range(4)

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


def _register_fakes() -> None:
    """Every op only writes into its arguments: the fake kernels do nothing, so
    ``torch.compile`` traces through the step."""
    for name in ("gradient_dots", "two_loop", "update", "push"):
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

    def prepare(self, arenas: list[Arena], group: dict) -> bool:
        plan = getattr(arenas[0], "native", None)
        if plan is None:
            plan = GroupPlan(arenas)
        plan.set_hyperparameters(group)
        return any(p.grad is not None for p in group["params"])

    def gradient_dots(self, arenas: list[Arena], group: dict, amp) -> list[Tensor]:
        plan = arenas[0].native
        grad_scale = None if amp is None else amp.grad_scale
        for a in plan.arenas:
            a.gradient_dots(group, grad_scale)
        return [a.probe for a in plan.arenas]

    def finish(self, arenas: list[Arena], group: dict, ok: dict, amp) -> None:
        """The rest of the step in the reference's order: under ``variant="released"`` a
        due step updates the averages and pushes the pair before the direction (E4),
        which then needs the dots against the new pair (a second pass 1)."""
        plan = arenas[0].native
        grad_scale = None if amp is None else amp.grad_scale
        mode = UPDATE_PAPER
        if group["variant"] == "released":
            mode = UPDATE_RELEASED
            # Every block of a group steps together; on the CPU the counter is host memory.
            if (int(arenas[0].counters["step"][0]) + 1) % group["update_period"] == 0:
                for a in plan.arenas:
                    a.update(group, ok[a.arena.device], grad_scale, UPDATE_RELEASED_AVERAGES)
                for a in plan.arenas:
                    a.push(group, ok[a.arena.device])
                for a in plan.arenas:
                    a.gradient_dots(group, grad_scale)
                for a in plan.arenas:
                    a.update(group, ok[a.arena.device], grad_scale, UPDATE_RELEASED_AFTER_PUSH)
                return
        for a in plan.arenas:
            a.update(group, ok[a.arena.device], grad_scale, mode)
        for a in plan.arenas:
            a.push(group, ok[a.arena.device])


cpp = NativeBackend("cpp", "cpu")
cuda = NativeBackend("cuda", "cuda")


class ArenaPlan:
    """One arena's tables and scratch, built once."""

    def __init__(self, arena: Arena, group: GroupPlan, block_offset: int):
        self.arena, self.group, self.block_offset = arena, group, block_offset
        m, dev = arena.m, arena.device
        chunks, blocks = chunk_tables(arena.layout, m)
        self.chunks = torch.tensor(chunks, dtype=torch.int64, device=dev).view(-1, CHUNK_COLUMNS)
        self.blocks = torch.tensor(blocks, dtype=torch.int64, device=dev).view(-1, 4)

        def scratch(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=dev)

        P, B = len(chunks), arena.layout.num_blocks
        self.partials = scratch(P, 2 * m + 1)
        self.pair_partials = scratch(P, PAIR_COLUMNS)
        self.gram_partials = scratch(P, 4 * m)
        self.coef = scratch(B, 2 * m + 1)
        self.probe = scratch(())
        self.stats = group.stats[dev]
        self.params = arena.params

    def _tensors(self):
        """The parameters and gradients as the ops take them: contiguous, in the
        arena's element order. A dense parameter in another memory order (channels_last,
        a transpose) is passed as a flat view of its memory, which is the arena's order
        for it (``Arena.param_view``), with its gradient in the same order (staged when
        its strides differ); any other layout is stepped through a contiguous copy.
        Returns ``(params, grads, staged)``; ``staged`` pairs copies to write back."""
        params = self.params
        grads = [p.grad for p in params]
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
        params, grads, _ = self._tensors()
        ops().gradient_dots(
            params, grads, a.history_s, a.history_y, self.chunks, self.partials, grad_scale,
            group["weight_decay"], group["maximize"], a.m,
        )
        ops().two_loop(
            self.partials, self.blocks, a.gram, a.counters["pair_count"], self.coef, self.stats,
            self.probe, self.block_offset, a.m,
        )

    def update(self, group: dict, ok: Tensor, grad_scale: Tensor | None, mode: int = 0) -> None:
        a = self.arena
        f, c = a.flat_state, a.counters
        beta_p, beta_g = group["ema_decay"]
        params, grads, staged = self._tensors()
        ops().update(
            params, grads, a.history_s, a.history_y, f["param_ema"], f["grad_ema"],
            f["momentum_buffer"], f["param_snapshot"], f["grad_snapshot"], self.chunks,
            self.coef, c["step"], c["pair_count"], self.stats, ok, grad_scale,
            self.pair_partials, self.group.lr[a.device], group["momentum"],
            group["weight_decay"], beta_p, beta_g, group["pair_momentum"],
            group["update_period"], a.m, group["maximize"], normalize_mode(group["normalize"]), mode,
        )
        if staged is not None:
            for p, copy in staged:
                p.copy_(copy)

    def push(self, group: dict, ok: Tensor) -> None:
        a = self.arena
        f, c = a.flat_state, a.counters
        ops().push(
            f["param_ema"], f["grad_ema"], f["param_snapshot"], f["grad_snapshot"],
            a.history_s, a.history_y, a.gram, self.chunks, self.blocks, self.pair_partials,
            self.gram_partials, ok, c["step"], c["pair_count"], c["skipped_pairs"],
            c["skipped_steps"], group["pair_momentum"], group["damping"], group["sigma_low"],
            group["sigma_high"], group["eps"], group["update_period"], a.m,
        )


class GroupPlan:
    """The plans of a group's arenas and what they share: the group's status rows
    (per device) and the learning rate as a 0-dim float64 tensor (per device)."""

    def __init__(self, arenas: list[Arena]):
        self.devices = list(dict.fromkeys(a.device for a in arenas))
        total = sum(a.layout.num_blocks for a in arenas)
        self.stats = {
            d: torch.zeros(total, STATS_COLUMNS, dtype=torch.float64, device=d)
            for d in self.devices
        }
        self.lr_buffers = {d: torch.zeros((), dtype=torch.float64, device=d) for d in self.devices}
        self.lr: dict[torch.device, Tensor] = dict(self.lr_buffers)  # what the ops read
        self.lr_value: float | None = None
        self.arenas = []
        offset = 0
        for arena in arenas:
            self.arenas.append(ArenaPlan(arena, self, offset))
            offset += arena.layout.num_blocks
        for arena in arenas:
            arena.native = self

    def set_hyperparameters(self, group: dict) -> None:
        """Point the ops' ``lr`` at the group's: a tensor lr on the device as it is,
        a float through a buffer filled when it changes."""
        lr = group["lr"]
        if isinstance(lr, Tensor):
            self.lr_value = None
            for d, buffer in self.lr_buffers.items():
                self.lr[d] = lr.view(()) if lr.device == d and lr.dtype == torch.float64 else buffer.copy_(lr.view(()))
            return
        if lr != self.lr_value:
            for buffer in self.lr_buffers.values():
                buffer.fill_(lr)
            self.lr_value = lr
        self.lr = dict(self.lr_buffers)


def _memory_order(t: Tensor) -> Tensor:
    """A dense tensor's elements as a 1-D view, in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def chunk_tables(layout, m: int) -> tuple[list[int], list[int]]:
    """The chunk table and block table of an arena layout, flattened (csrc/ops.h)."""
    offsets = list(layout.param_offsets)
    ends = offsets[1:] + [layout.numel]
    chunks: list[int] = []
    blocks: list[int] = []
    count = 0
    for b in range(layout.num_blocks):
        lo, hi = layout.block_bounds[b], layout.block_bounds[b + 1]
        first = count
        for i, (p_lo, p_hi) in enumerate(zip(offsets, ends)):
            a, z = max(lo, p_lo), min(hi, p_hi)
            for start in range(a, z, CHUNK):
                chunks += [start, min(start + CHUNK, z), b, i, p_lo, m * lo - lo, hi - lo]
                count += 1
        blocks += [lo, hi, first, count]
    return chunks, blocks
