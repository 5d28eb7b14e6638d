"""Flat storage of one parameter group's optimizer state on one (device, dtype).

Every backend keeps its state in an :class:`Arena`: each per-element quantity is
one contiguous ``[N]`` buffer over the group's parameters laid end to end (see
:mod:`.layout`), and the history is one ``[m * N]`` buffer, block-major, so
block ``b`` sees its ring as a contiguous ``[m, n_b]`` matrix. ``optimizer.state``
holds views into these buffers, so ``state_dict()`` has the same layout on
every backend and a checkpoint moves between them. An arena holds state and its
views only; what a backend needs besides (tables, scratch) is its plan's
(mlbfgs_fused/backends/__init__.py).

Per parameter ``p`` (views shaped like ``p``):
    ``momentum_buffer``, ``param_ema``, ``grad_ema``, ``param_snapshot``, ``grad_snapshot``
Per parameter in which ``k >= 1`` blocks start, the state of those blocks (arena order),
every value a tensor as in any torch optimizer's state:
    ``block_step``, ``pair_count``, ``skipped_pairs``, ``skipped_steps`` (int64 ``[k]``:
    steps taken, pairs accepted so far, pairs and steps skipped), ``gram``
    (``[k, 3, m, m]`` float64: ``S S^T``, ``S Y^T``, ``Y Y^T``) and the rings
    ``history_s``, ``history_y``: ``[m, n_b]`` for one block, the blocks' ``[m, n_b]``
    matrices end to end as one flat tensor for several (a parameter cut by ``blocks=<int>``).
``block_states`` gives them per block, with each ring as its ``[m, n_b]`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import ArenaLayout

PARAM_STATE_KEYS = ("momentum_buffer", "param_ema", "grad_ema", "param_snapshot", "grad_snapshot")
BLOCK_COUNTER_DTYPES = {
    "step": torch.int64,
    "pair_count": torch.int64,
    "skipped_pairs": torch.int64,
    "skipped_steps": torch.int64,
}
# The block state's keys in optimizer.state: "step" is "block_step" there, since torch
# gives a state key named "step" a meaning of its own (a float32 count when loading a
# fused or capturable optimizer).
STATE_KEY = {"step": "block_step", "pair_count": "pair_count", "skipped_pairs": "skipped_pairs",
             "skipped_steps": "skipped_steps", "history_s": "history_s", "history_y": "history_y",
             "gram": "gram"}
BLOCK_STATE_KEYS = tuple(STATE_KEY.values())


class Arena:
    """The state of one group's parameters on one (device, dtype), and its views.

    ``PARAM_KEYS`` names the per-element buffers; the first of them is the one whose
    saved copy tells a checkpoint's memory order and completeness (:meth:`fill`).
    :class:`~.lbfgs_arena.LBFGSArena` is LBFGS's arena over the same machinery."""

    PARAM_KEYS: tuple[str, ...] = PARAM_STATE_KEYS
    BLOCK_KEYS: tuple[str, ...] = BLOCK_STATE_KEYS

    def __init__(
        self,
        params: list[Tensor],
        layout: ArenaLayout,
        history_size: int,
        history_dtype: torch.dtype | None,
    ):
        self.layout = layout
        self.params = [params[i] for i in layout.order]  # arena order
        first = params[0]  # an arena of a distributed rank may hold none of them
        self.device, self.dtype = first.device, first.dtype
        self.history_dtype = history_dtype or first.dtype
        self.m = history_size
        n, B, m = layout.numel, layout.num_blocks, history_size
        dev = self.device

        def flat(dtype=None):
            return torch.zeros(n, dtype=dtype or self.dtype, device=dev)

        self.flat_state = {key: flat() for key in PARAM_STATE_KEYS}
        self.history_s = torch.zeros(m * n, dtype=self.history_dtype, device=dev)
        self.history_y = torch.zeros(m * n, dtype=self.history_dtype, device=dev)
        self.gram = torch.zeros(B, 3, m, m, dtype=torch.float64, device=dev)
        self.counters = {
            key: torch.zeros(B, dtype=dtype, device=dev)
            for key, dtype in BLOCK_COUNTER_DTYPES.items()
        }

    # -- geometry -------------------------------------------------------------
    def param_slice(self, i: int) -> slice:
        start = self.layout.param_offsets[i]
        return slice(start, start + self.params[i].numel())

    def param_view(self, flat: Tensor, i: int) -> Tensor:
        """Parameter ``i``'s slice of a flat buffer, shaped like it. A dense parameter
        stored in another order (channels_last, a transpose) gets its own strides: the
        slice follows the parameter's memory order, element for element."""
        p = self.params[i]
        start = self.layout.param_offsets[i]
        if p.is_contiguous() or not is_dense(p):
            return flat[start : start + p.numel()].view(p.shape)
        return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + start)

    def local_param(self, i: int) -> Tensor:
        """The tensor the backend steps for arena position ``i``: the parameter itself
        (a distributed rank steps its piece of it, see mlbfgs_fused/distributed/)."""
        return self.params[i]

    def local_grad(self, i: int) -> Tensor:
        return self.params[i].grad

    def local_params(self) -> list[Tensor]:
        """Every :meth:`local_param`, in arena order (what the fused kernels step)."""
        return self.params

    def local_grads(self) -> list[Tensor | None]:
        """Every :meth:`local_grad`, in arena order (None where there is no gradient)."""
        return [p.grad for p in self.params]

    def block_slice(self, b: int) -> slice:
        bounds = self.layout.block_bounds
        return slice(bounds[b], bounds[b + 1])

    def history_view(self, history: Tensor, b: int) -> Tensor:
        lo, hi = self.layout.block_bounds[b], self.layout.block_bounds[b + 1]
        return history[self.m * lo : self.m * hi].view(self.m, hi - lo)

    def block_state(self, b: int) -> dict:
        """Block ``b``'s state as views: counters (0-dim), rings ``[m, n_b]``, ``gram``."""
        state = {key: counter[b] for key, counter in self.counters.items()}
        state["history_s"] = self.history_view(self.history_s, b)
        state["history_y"] = self.history_view(self.history_y, b)
        state["gram"] = self.gram[b]
        return state

    def owned_state(self, blocks: list[int]) -> dict:
        """The state of consecutive blocks (those starting in one parameter) as views,
        under the keys of optimizer.state (module docstring)."""
        first, end = blocks[0], blocks[-1] + 1
        lo, hi = self.layout.block_bounds[first], self.layout.block_bounds[end]
        state = {STATE_KEY[key]: counter[first:end] for key, counter in self.counters.items()}
        for key in ("history_s", "history_y"):
            ring = getattr(self, key)
            state[key] = self.history_view(ring, first) if len(blocks) == 1 else ring[self.m * lo : self.m * hi]
        state["gram"] = self.gram[first:end]
        return state

    # -- reductions -------------------------------------------------------------
    # The backends pass every inner product through these two, so that a rank holding
    # part of the arena (mlbfgs_fused/distributed/) completes it with one collective.
    # Where a hook is a no-op (always here) the fused backends keep their reductions
    # inside their kernels; where it is not, they add each block's partial rows first
    # and hand the per-block sums to the hook (docs/design.md, "Distributed").
    #: whether :meth:`block_sum` completes anything: a block's elements lie on several ranks
    partial_blocks = False
    #: whether :meth:`group_sum` completes anything: the group's blocks lie on several ranks
    partial_group = False

    def block_sum(self, x: Tensor) -> Tensor:
        """Per-block partial sums (any shape) made whole, in place; here they are."""
        return x

    def group_sum(self, x: Tensor) -> Tensor:
        """A sum over the arena's blocks made whole over the group, in place; here it is."""
        return x

    # -- optimizer.state ------------------------------------------------------
    def blocks_by_param(self) -> dict[int, list[int]]:
        owners: dict[int, list[int]] = {}
        for b in range(self.layout.num_blocks):
            owners.setdefault(self.layout.block_first_param(b), []).append(b)
        return owners

    def adopt(self, state: dict) -> None:
        """:meth:`fill` then :meth:`bind`."""
        self.fill(state)
        self.bind(state)

    def fill(self, state: dict) -> None:
        """Copy into the arena what ``state`` holds (a loaded checkpoint, or views of an
        earlier arena) and initialise the rest; ``state`` itself is not changed, so an
        error here (a saved shape that does not fit) leaves the optimizer as it was.

        Per-element state is copied by logical index, so it follows a parameter whose
        memory order changed (``model.to(memory_format=...)``); the history rows follow
        it too, from the memory order the saved per-element state was laid out in
        (docs/design.md, "State layout")."""
        owners = self.blocks_by_param()
        lead = self.PARAM_KEYS[0]
        saved_orders = [saved_strides(state[p].get(lead), p) for p in self.params]
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p_state = state[p]
                for key in self.PARAM_KEYS:
                    view = self.param_view(self.flat_state[key], i)
                    if key in p_state:
                        _copy_checked(view, p_state[key], key)
                    elif key == "param_ema":
                        view.copy_(p)  # the EMA of the parameters starts at the parameters
                self._copy_blocks(p_state, owners.get(i, []), saved_orders, p)

    def bind(self, state: dict) -> None:
        """Point ``state`` at the arena's buffers (after :meth:`fill`)."""
        owners = self.blocks_by_param()
        for i, p in enumerate(self.params):
            p_state = state[p]
            for key in self.PARAM_KEYS:
                p_state[key] = self.param_view(self.flat_state[key], i)
            self._point_blocks(p_state, owners.get(i, []))

    def first_non_finite(self) -> str | None:
        """The name of a state buffer holding a NaN or an infinity, or None (reads the
        device: for checkpoints as they load, never in a step)."""
        buffers = {**self.flat_state, "history_s": self.history_s, "history_y": self.history_y, "gram": self.gram}
        for name, buffer in buffers.items():
            if not bool(torch.isfinite(buffer).all()):
                return name
        return None

    def _copy_blocks(self, p_state: dict, blocks: list[int], saved_orders: list | None, p: Tensor) -> None:
        """Copy the saved state of the blocks starting in one parameter (if any) into
        the arena. A history row covers its block's parameters in their memory order;
        ``saved_orders[i]`` is the order parameter ``i``'s saved rows were written in."""
        present = [key for key in self.BLOCK_KEYS if key in p_state]
        if not present:
            if blocks and self.PARAM_KEYS[0] in p_state:
                raise ValueError(
                    f"loaded optimizer state lacks the curvature history of the {len(blocks)} "
                    f"block(s) starting in a parameter of shape {tuple(p.shape)} (its "
                    f"{', '.join(map(repr, self.BLOCK_KEYS))}) while it holds the parameter's other "
                    "state: the checkpoint is incomplete; loading it would restart the curvature "
                    "history from nothing"
                )
            return
        if not blocks:
            raise ValueError(
                f"loaded optimizer state has block state ({present}) for a parameter of shape "
                f"{tuple(p.shape)} in which no block starts: a different block layout"
            )
        missing = [key for key in self.BLOCK_KEYS if key not in p_state]
        if missing:
            raise ValueError(f"loaded optimizer state lacks {missing} of a parameter's blocks: the checkpoint is incomplete")
        views = self.owned_state(blocks)
        for key, view in views.items():
            if key not in ("history_s", "history_y"):
                _copy_checked(view, p_state[key], key)
                continue
            saved = p_state[key]
            if tuple(saved.shape) != tuple(view.shape):
                _copy_checked(view, saved, key)  # raises, naming the shapes
            saved = saved.reshape(-1)
            start = self.m * self.layout.block_bounds[blocks[0]]
            for b in blocks:  # each block's [m, n_b] matrix, saved end to end
                lo, hi = self.layout.block_bounds[b], self.layout.block_bounds[b + 1]
                at = self.m * lo - start
                segment = saved[at : at + self.m * (hi - lo)].view(self.m, hi - lo)
                self._copy_history(self.history_view(getattr(self, key), b), segment, key, b, saved_orders)

    def _copy_history(self, dst: Tensor, src: Tensor, key: str, b: int, saved_orders: list | None) -> None:
        """``dst`` (the block's ``[m, n_b]`` ring) from ``src``, each parameter's columns
        moved from the memory order they were saved in to the one the arena uses now."""
        _copy_checked(dst, src, key)
        if saved_orders is None:
            return
        lo, hi = self.layout.block_bounds[b], self.layout.block_bounds[b + 1]
        for i, p in enumerate(self.params):
            start = self.layout.param_offsets[i]
            if start + p.numel() <= lo or start >= hi or same_order(p.shape, saved_orders[i], state_strides(p)):
                continue
            if start < lo or start + p.numel() > hi:
                raise RuntimeError(
                    "a parameter that spans several blocks changed memory format; its "
                    "curvature history cannot follow (use blocks='group' or 'tensor')"
                )
            ring_param_view(dst, start - lo, p.shape, state_strides(p)).copy_(
                ring_param_view(src, start - lo, p.shape, saved_orders[i])
            )

    def _point_blocks(self, p_state: dict, blocks: list[int]) -> None:
        """Point a parameter's block state at the arena's views of the blocks starting in
        it (none: the keys are dropped)."""
        if blocks:
            p_state.update(self.owned_state(blocks))
        else:
            for key in self.BLOCK_KEYS:
                p_state.pop(key, None)


def is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive memory slots, in any
    dimension order (contiguous, channels_last, a transpose): dense and non-overlapping."""
    expected = 1
    for size, stride in sorted(
        ((n, s) for n, s in zip(t.shape, t.stride()) if n > 1), key=lambda pair: pair[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(tuple(shape)):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def state_strides(p: Tensor) -> tuple[int, ...]:
    """The strides of the arena's view of ``p``'s state (:meth:`Arena.param_view`): the
    parameter's own when it is dense in another order (channels_last, a transpose),
    row-major otherwise (a parameter that is not dense is stepped through a copy)."""
    if not p.is_contiguous() and is_dense(p):
        return tuple(p.stride())
    return contiguous_strides(p.shape)


def saved_strides(saved, p: Tensor) -> tuple[int, ...]:
    """The memory order a parameter's saved state was laid out in: that of its saved
    per-element state (a view of an arena, or a checkpoint's copy of one, which
    ``torch.save`` and ``Tensor.to`` keep), row-major when there is none."""
    if isinstance(saved, Tensor) and tuple(saved.shape) == tuple(p.shape) and is_dense(saved):
        return tuple(saved.stride())
    return contiguous_strides(p.shape)


def same_order(shape, a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether strides ``a`` and ``b`` lay out ``shape`` alike (size-1 dimensions aside)."""
    return all(x == y for x, y, n in zip(a, b, shape) if n > 1)


def ring_param_view(ring: Tensor, start: int, shape, strides: tuple[int, ...]) -> Tensor:
    """The columns ``[start, start + numel)`` of an ``[m, n]`` ring, as ``[m, *shape]``
    laid out with ``strides`` (a parameter's memory order)."""
    return ring.as_strided(
        (ring.shape[0], *shape), (ring.stride(0), *strides), ring.storage_offset() + start
    )


def _copy_checked(dst: Tensor, src: Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"loaded state '{key}' has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)
