"""Flat storage of one parameter group's optimizer state on one (device, dtype).

Every backend keeps its state in an :class:`Arena`: each per-element quantity is
one contiguous ``[N]`` buffer over the group's parameters laid end to end (see
:mod:`._blocks`), and the history is one ``[m * N]`` buffer, block-major, so
block ``b`` sees its ring as a contiguous ``[m, n_b]`` matrix. ``optimizer.state``
holds views into these buffers, so ``state_dict()`` has the same layout on
every backend and a checkpoint moves between them.

Per parameter ``p`` (views shaped like ``p``):
    ``momentum_buffer``, ``param_ema``, ``grad_ema``, ``param_snapshot``, ``grad_snapshot``
Per block, a dict in ``state[first_param]["blocks"]`` (blocks in arena order):
    ``step`` (int64, steps taken), ``pair_count`` (int64, pairs accepted so far),
    ``skipped_pairs``, ``skipped_steps`` (int64), ``history_s``, ``history_y``
    (``[m, n_b]`` rings) and ``gram`` (``[3, m, m]`` float64: ``S S^T``, ``S Y^T``, ``Y Y^T``).
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
BLOCK_STATE_KEYS = (*BLOCK_COUNTER_DTYPES, "history_s", "history_y", "gram")


class Arena:
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
        self.fused = None  # the fused backend's plan
        self.counter_probe = None  # the foreach backend's host-side view of the step counter
        self._work = None
        self._grad_flat = None

    @property
    def grad_flat(self) -> Tensor:
        """The foreach backend's gathered gradient (scratch, not state), allocated on first use."""
        if self._grad_flat is None:
            self._grad_flat = torch.zeros(self.layout.numel, dtype=self.dtype, device=self.device)
        return self._grad_flat

    @property
    def work(self) -> Tensor:
        """A scratch vector of the foreach backend, allocated on first use (not a
        ``functools.cached_property``: its lock stops torch.compile)."""
        if self._work is None:
            self._work = torch.zeros(self.layout.numel, dtype=self.dtype, device=self.device)
        return self._work

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

    def block_slice(self, b: int) -> slice:
        bounds = self.layout.block_bounds
        return slice(bounds[b], bounds[b + 1])

    def history_view(self, history: Tensor, b: int) -> Tensor:
        lo, hi = self.layout.block_bounds[b], self.layout.block_bounds[b + 1]
        return history[self.m * lo : self.m * hi].view(self.m, hi - lo)

    def block_state(self, b: int) -> dict:
        state = {key: counter[b] for key, counter in self.counters.items()}
        state["history_s"] = self.history_view(self.history_s, b)
        state["history_y"] = self.history_view(self.history_y, b)
        state["gram"] = self.gram[b]
        return state

    # -- reductions -------------------------------------------------------------
    # The backends pass every inner product through these two, so that a rank holding
    # part of the arena (mlbfgs_fused/distributed/) completes it with one collective.
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
        """Fill the arena from ``state`` where it holds entries (a loaded
        checkpoint, or state bound to an earlier arena), initialise the rest,
        then point ``state`` at the arena's buffers."""
        owners = self.blocks_by_param()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p_state = state[p]
                for key in PARAM_STATE_KEYS:
                    view = self.param_view(self.flat_state[key], i)
                    if key in p_state:
                        _copy_checked(view, p_state[key], key)
                    elif key == "param_ema":
                        view.copy_(p)  # the EMA of the parameters starts at the parameters
                for key in PARAM_STATE_KEYS:
                    p_state[key] = self.param_view(self.flat_state[key], i)
                blocks = owners.get(i, [])
                self._adopt_blocks(p_state, blocks)


    def _adopt_blocks(self, p_state: dict, blocks: list[int]) -> None:
        """Copy the saved state of the blocks starting in one parameter (if any) into
        the arena, then point that parameter's ``"blocks"`` entry at the arena's views."""
        saved = p_state.get("blocks")
        if saved is not None:
            if len(saved) != len(blocks):
                raise ValueError(
                    "loaded optimizer state has a different block layout "
                    f"({len(saved)} blocks start in a parameter that now starts {len(blocks)})"
                )
            for b, saved_block in zip(blocks, saved):
                for key, view in self.block_state(b).items():
                    _copy_checked(view, saved_block[key], key)
        if blocks:
            p_state["blocks"] = [self.block_state(b) for b in blocks]
        else:
            p_state.pop("blocks", None)

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


def _copy_checked(dst: Tensor, src: Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"loaded state '{key}' has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src)
