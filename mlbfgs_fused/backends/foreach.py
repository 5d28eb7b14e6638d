"""The portable backend: the mL-BFGS step with ``torch._foreach_*`` and flat tensor ops.

Works on any device. It never reads a device value on the host: every
data-dependent decision of docs/design.md ("The step": the non-finite step, the
warm-up, normalisation, whether this is a pair-update step, damping, pair skipping)
is a mask or a factor in tensor arithmetic, chosen so that a masked-off update is an
exact identity (``x * 1``, ``x + 0``, ``lerp`` with weight 0). The pair update runs
(masked) only on steps where the host's :class:`CounterProbe` says a pair can be due.

The passes of :class:`ForeachPlan`, per arena, in the order of
:func:`mlbfgs_fused.backends.run_passes`: ``gradient_dots`` gathers ``g`` into the
plan's scratch and takes ``S g``, ``Y g``, ``g.g``; ``two_loop`` finds the coefficients
of ``d`` and ``||d||`` from the Gram matrices; ``update`` writes ``d`` already
normalised into ``work``, then the averages, heavy ball and parameter write; ``push``
forms the pair in the two scratch vectors (under ``variant="released"`` it then gathers
``g`` again and restarts the gradient average, E2, and ``two_loop`` takes the dots with
the new pair); ``commit`` counts.

Memory: besides the plan's two scratch vectors (the gathered gradient and ``work``) no
step allocates anything parameter-sized for float32/float64 data; 16-bit data goes
through bounded chunks (Note [reductions in float32 or wider]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_gradients  # noqa: F401 -- an entry point
from .._math import NORMALIZE_NEVER, damping_factor, direction_scale, normalize_mode, two_loop_coefficients
from .._state.arena import Arena
from . import Plan
from ._counter import CounterProbe


def available() -> bool:
    return True


def supported_devices() -> list[str]:
    return ["cpu", "cuda", "mps", "xpu", "meta"]


def plan(arenas: list[Arena], group: dict) -> ForeachPlan:
    return ForeachPlan(arenas)


def lbfgs_plan(arenas, gram, pair_count, maximize: bool, line_search: bool):
    """LBFGS's passes on this backend (:mod:`.lbfgs_foreach`)."""
    from .lbfgs_foreach import ForeachLBFGSPlan

    return ForeachLBFGSPlan(arenas, gram, pair_count, maximize, line_search)


class ForeachPlan(Plan):
    """The passes over a group's arenas; the per-arena scratch lives in :class:`Scratch`."""

    def __init__(self, arenas: list[Arena]):
        self.arenas = arenas
        self.scratch = [Scratch(arena) for arena in arenas]
        self.devices = list(dict.fromkeys(a.device for a in arenas))
        self.home = arenas[0].device

    def prepare(self, group: dict) -> bool:
        return any(p.grad is not None for p in group["params"])

    def gradient_dots(self, group: dict, amp) -> list[Tensor]:
        probes = []
        for work in self.scratch:
            work.bind()
            work.gather_gradient(group, amp)
            work.dots = gradient_dots(work)
            probes.append(work.dots[2].sum())
        return probes

    def two_loop(self, group: dict, ok: dict, after_push: bool = False) -> None:
        for work in self.scratch:
            ok_here = ok[work.arena.device]
            if after_push and work.pair_step:
                work.dots = gradient_dots(work)  # with the pair just pushed
            work.coefficients = direction_coefficients(work, ok_here, work.dots)
        d_scale = group_direction_scale(self.arenas, [w.coefficients[3] for w in self.scratch], group["normalize"], self.home)
        for work in self.scratch:
            work.d_scale = torch.where(ok[work.arena.device], d_scale.to(work.arena.device), 0.0)

    def update(self, group: dict, ok: dict, amp, averages: bool = True, direction: bool = True) -> None:
        for work in self.scratch:
            ok_here = ok[work.arena.device]
            if direction:
                write_direction(work, work.coefficients, work.d_scale)
            else:
                work.grad.masked_fill_(ok_here.logical_not(), 0.0)  # a masked product must not meet a NaN
            if averages:
                update_averages(work, group, ok_here)
            if direction:
                heavy_ball(work, group, ok_here)

    def push(self, group: dict, ok: dict, amp) -> None:
        released = group["variant"] == "released"
        T = group["update_period"]
        for work in self.scratch:
            arena, ok_here = work.arena, ok[work.arena.device]
            # Under capture the host's knowledge would be frozen into the graph.
            work.pair_step = group["capturable"] or work.counter_probe.pair_update_possible(T)
            if not work.pair_step:
                continue
            t = arena.counters["step"] + ok_here  # this step's t (the counter moves in commit)
            push_pairs(work, group, ok_here, t)
            if released:  # the push used g's scratch: gather g again, then E2
                work.gather_gradient(group, amp)
                work.grad.masked_fill_(ok_here.logical_not(), 0.0)
                reset_grad_average(work, ok_here & (torch.remainder(t[0], T) == 0))

    def commit(self, group: dict, ok: dict) -> None:
        for work in self.scratch:
            arena, ok_here = work.arena, ok[work.arena.device]
            arena.counters["step"].add_(ok_here)
            arena.counters["skipped_steps"].add_(ok_here.logical_not())
            if not group["capturable"]:
                work.counter_probe.record(arena.counters["step"][0])


class Scratch:
    """One arena's scratch for the foreach passes (not state): the gathered gradient,
    the work vector (``d``, then ``lr * buf``; ``s`` in the push), float64 chunks for
    wide dots, the host's view of the step counter; and, per step, which parameters
    have a gradient with lists of matching views for the ``_foreach`` ops."""

    def __init__(self, arena: Arena):
        self.arena = arena
        zeros = dict(dtype=arena.dtype, device=arena.device)
        self.grad = torch.zeros(arena.layout.numel, **zeros)
        self.work = torch.zeros(arena.layout.numel, **zeros)
        self.wide = torch.zeros(2, min(arena.layout.numel, _CHUNK), dtype=torch.float64, device=arena.device)
        # A rank whose pair update issues collectives waits for the counter's copy, so
        # that every rank runs it at the same steps (docs/design.md, "Distributed").
        self.counter_probe = CounterProbe(arena.device, wait=arena.partial_blocks)
        self.pair_step = False
        self.dots = self.coefficients = self.d_scale = None

    def bind(self) -> None:
        """The step's parameters with a gradient, and their tensors."""
        arena = self.arena
        self.present = [i for i, p in enumerate(arena.params) if p.grad is not None]
        self.all_present = len(self.present) == len(arena.params)
        # The tensors stepped: the parameters, or a distributed rank's pieces of them.
        self.params = [arena.local_param(i) for i in self.present]
        self.grads = [arena.local_grad(i) for i in self.present]
        if not self.present:  # nothing to write here; _foreach ops take no empty list
            self.params = self.grads = [self.grad[:0]]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat arena buffer over the parameters that have gradients."""
        if self.all_present:
            return [flat]
        return self.shaped_views(flat)

    def shaped_views(self, flat: Tensor) -> list[Tensor]:
        if not self.present:
            return [flat[:0]]
        return [self.arena.param_view(flat, i) for i in self.present]

    def gather_gradient(self, group: dict, amp) -> None:
        """``g = grad / grad_scale`` (negated under ``maximize``) ``+ weight_decay * theta``
        into the scratch, zero where a parameter has no gradient. ``.grad`` is only
        read: a ``GradScaler``'s scale is divided out here, never in place."""
        g = self.grad
        if not self.all_present:
            g.zero_()
        g_views = self.shaped_views(g)
        torch._foreach_copy_(g_views, self.grads)
        if amp is not None and amp.grad_scale is not None:
            torch._foreach_div_(g_views, amp.grad_scale.to(self.arena.device, non_blocking=True))
        if group["maximize"]:
            g.neg_()
        if group["weight_decay"] != 0:
            torch._foreach_add_(g_views, self.params, alpha=group["weight_decay"])


def group_direction_scale(
    arenas: list[Arena], d_dot_d: list[Tensor], normalize, home: torch.device
) -> Tensor:
    """``1 / ||d||`` over the whole group, or 1, by the rule of ``normalize``
    (mlbfgs_fused/_math.py, Note [direction scale])."""
    mode = normalize_mode(normalize)
    if mode == NORMALIZE_NEVER:
        return torch.ones((), dtype=torch.float64, device=home)
    total = torch.stack([x.sum().to(home) for x in d_dot_d]).sum()
    held = torch.stack([(a.counters["pair_count"] > 0).sum().to(home) for a in arenas]).sum()
    total, held = arenas[0].group_sum(torch.stack([total, held.double()])).unbind()
    return direction_scale(total, held > 0, mode)


def gradient_dots(work: Scratch) -> tuple[Tensor, Tensor, Tensor]:
    """``S g``, ``Y g`` (``[B, m]``) and ``g.g`` (``[B]``) per block, in float64.
    ``g.g`` doubles as the finiteness flag: it is finite iff ``g`` is (summed from
    float64 squares, so no finite gradient overflows it)."""
    arena, g = work.arena, work.grad
    B, m = arena.layout.num_blocks, arena.m
    # One [B, 2m + 1] tensor, so that a distributed rank completes it in one collective.
    dots = torch.empty(B, 2 * m + 1, dtype=torch.float64, device=arena.device)
    Sg, Yg, gg = dots[:, :m], dots[:, m : 2 * m], dots[:, 2 * m]
    for b in range(B):
        g_b = g[arena.block_slice(b)]
        S, Y = _rings(arena, b)
        Sg[b] = _ring_dots(S, g_b)
        Yg[b] = _ring_dots(Y, g_b)
        gg[b] = _dot(g_b, g_b, work.wide)
    arena.block_sum(dots)
    return Sg, Yg, gg


def direction_coefficients(work: Scratch, ok: Tensor, dots: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
    """The coefficients of ``d = H g`` per block (``c_g``, ``c_s``, ``c_y``) and ``||d_b||^2``,
    found on scalars from the Gram matrices (vector-free): ``d`` is written only once
    its group scale is known (:func:`write_direction`), so a 16-bit ``d`` is stored
    normalised and never overflows on the way.

    A non-finite step has its gradient and dots zeroed first, so it produces
    ``d = 0`` and no NaN reaches any state through a masked product.
    """
    arena = work.arena
    not_ok = ok.logical_not()
    work.grad.masked_fill_(not_ok, 0.0)
    Sg, Yg, gg = (x.masked_fill(not_ok, 0.0) for x in dots)
    c_g, c_s, c_y, d_dot_d = two_loop_coefficients(arena.gram, Sg, Yg, gg, arena.counters["pair_count"])
    return c_g, c_s, c_y, d_dot_d.clamp(min=0.0)  # rounding must not make a norm NaN


def write_direction(work: Scratch, coefficients: tuple[Tensor, ...], scale: Tensor) -> None:
    """``work = scale * (c_g g + S^T c_s + Y^T c_y)`` per block; ``scale`` is 0 on a
    skipped step."""
    arena = work.arena
    c_g, c_s, c_y, _ = coefficients
    c_g, c_s, c_y = c_g * scale, c_s * scale, c_y * scale
    g, d = work.grad, work.work
    for b in range(arena.layout.num_blocks):
        sl = arena.block_slice(b)
        S, Y = _rings(arena, b)
        _combine(d[sl], g[sl], S, Y, c_g[b], c_s[b], c_y[b])


def update_averages(work: Scratch, group: dict, ok: Tensor) -> None:
    """The averages of the parameters and gradients, with the parameters before this
    step's write; an identity when ``ok`` is False. ``variant="paper"``:
    ``P = beta_p P + (1 - beta_p) theta`` (a lerp); ``"released"``: ``P = beta_p P + theta``.
    Both start at their first sample."""
    arena = work.arena
    flat = arena.flat_state
    first = arena.counters["step"][0] == 0
    one = torch.ones((), dtype=arena.dtype, device=arena.device)
    zero = torch.zeros((), dtype=arena.dtype, device=arena.device)
    p_ema = work.shaped_views(flat["param_ema"])
    g_ema = work.views(flat["grad_ema"])
    g = work.views(work.grad)
    for beta, average, sample in zip(group["ema_decay"], (p_ema, g_ema), (work.params, g)):
        if group["variant"] == "released":
            decay = torch.where(ok, torch.where(first, zero, beta), one)
            torch._foreach_mul_(average, decay)
            torch._foreach_addcmul_(average, sample, [torch.where(ok, one, zero)] * len(average))
        else:
            weight = torch.where(ok, torch.where(first, one, 1 - beta), zero)
            torch._foreach_lerp_(average, sample, [weight] * len(average))


def reset_grad_average(work: Scratch, due: Tensor) -> None:
    """``variant="released"`` (E2): ``G = g`` at a pair step, after the snapshots."""
    weight = due.to(work.arena.dtype)
    g_ema = work.views(work.arena.flat_state["grad_ema"])
    torch._foreach_lerp_(g_ema, work.views(work.grad), [weight] * len(g_ema))


def heavy_ball(work: Scratch, group: dict, ok: Tensor) -> None:
    """``buf = momentum * buf + d`` with the direction in ``work``, then the parameter
    write ``theta -= lr * buf``, each an identity when ``ok`` is False."""
    arena = work.arena
    flat = arena.flat_state
    one = torch.ones((), dtype=arena.dtype, device=arena.device)
    zero = torch.zeros((), dtype=arena.dtype, device=arena.device)
    momentum = torch.where(ok, group["momentum"], one)
    lr = _scalar(group["lr"], arena)
    neg_lr = torch.where(ok, -lr, zero)
    d = work.work
    buf = work.views(flat["momentum_buffer"])
    torch._foreach_mul_(buf, momentum)
    torch._foreach_add_(buf, work.views(d))
    # theta -= lr * buf, with lr * buf formed in the (now free) work buffer.
    torch.mul(flat["momentum_buffer"], neg_lr, out=d)
    torch._foreach_add_(work.params, work.shaped_views(d))


def push_pairs(work: Scratch, group: dict, ok: Tensor, t: Tensor) -> None:
    """The pair update of docs/design.md (the step, 7) for every block, applied where
    due (masked), ``t`` being this step's index per block. ``s`` and ``y`` are formed in
    the two scratch vectors (``work`` and the gathered gradient, which this overwrites);
    the ring rows are read at device-side slots through one-hot matrix-vector products,
    so no parameter-sized temporary is allocated (one per block in the history dtype
    when ``history_dtype`` differs from the parameters', to round the new row)."""
    arena = work.arena
    T, r, eps = group["update_period"], group["pair_momentum"], group["eps"]
    m = arena.m
    flat = arena.flat_state
    pair_count = arena.counters["pair_count"]
    due = ok & (torch.remainder(t, T) == 0)
    forms_pair = due & (t > T)  # snapshots exist from the first update on
    s_all, y_all = work.work, work.grad
    torch.sub(flat["param_ema"], flat["param_snapshot"], out=s_all)
    torch.sub(flat["grad_ema"], flat["grad_snapshot"], out=y_all)
    slots = torch.arange(m, device=arena.device)
    r_value = torch.full((), r, dtype=torch.float64, device=arena.device)  # where() on floats is float32
    B = arena.layout.num_blocks
    # The blocks go through each phase together, so that the inner products of all
    # blocks are completed by one arena.block_sum per phase (one collective each on a
    # distributed rank): damping sums [B, 2], curvatures [B], Gram rows [B, 4, m].
    sums = torch.empty(B, 2, dtype=torch.float64, device=arena.device)
    for b in range(B):
        sl = arena.block_slice(b)
        s, y = s_all[sl], y_all[sl]
        S, Y = _rings(arena, b)
        # Pair momentum with the newest held pair: x = (1 - r) x + r x_newest.
        r_eff = torch.where(pair_count[b] > 0, r_value, 0.0)
        newest = (slots == torch.remainder(pair_count[b] - 1, m)) * r_eff  # [m] float64
        for x, R in ((s, S), (y, Y)):
            x.mul_((1 - r_eff).to(arena.dtype))
            _add_ring_combination(x, R, newest)
        sums[b, 0], sums[b, 1] = _dot(s, y, work.wide), _dot(s, s, work.wide)
    s_dot_y, s_dot_s = arena.block_sum(sums).unbind(1)
    phi = damping_factor(s_dot_y, s_dot_s, group["sigma_low"], group["sigma_high"], group["damping"], eps)
    curvature = torch.empty(B, dtype=torch.float64, device=arena.device)
    for b in range(B):
        sl = arena.block_slice(b)
        s, y = s_all[sl], y_all[sl]
        torch.lerp(s, y, phi[b].to(arena.dtype), out=y)  # y <- yhat = phi y + (1 - phi) s
        curvature[b] = _dot(s, y, work.wide)
    curvature = arena.block_sum(curvature)
    accept = forms_pair & torch.isfinite(curvature) & (curvature > eps)

    rows = torch.empty(B, 4, m, dtype=torch.float64, device=arena.device)
    slot = torch.remainder(pair_count, m)
    for b in range(B):
        sl = arena.block_slice(b)
        s, y = s_all[sl], y_all[sl]
        S, Y = _rings(arena, b)
        # The slot's row becomes the new pair if accepted, else stays: x = accept ? x : R[slot].
        keep = (slots == slot[b]) & accept[b].logical_not()
        for x, R, ring in ((s, S, arena.history_s), (y, Y, arena.history_y)):
            x.masked_fill_(accept[b].logical_not(), 0.0)
            _add_ring_combination(x, R, keep.double())
            stored = x.unsqueeze(0)
            if arena.history_dtype != arena.dtype:
                stored = stored.to(arena.history_dtype)
                x.copy_(stored[0])  # the row as stored (rounded), for the Gram rows
            arena.history_view(ring, b).index_copy_(0, slot[b].view(1), stored)
        rows[b, 0], rows[b, 1] = _ring_dots(S, s), _ring_dots(S, y)
        rows[b, 2], rows[b, 3] = _ring_dots(Y, s), _ring_dots(Y, y)
    rows = arena.block_sum(rows)
    for b in range(B):
        sl = arena.block_slice(b)
        ss_row, sy_col, ys_row, yy_row = rows[b].unbind()
        gram = arena.gram[b]
        j = slot[b].view(1)
        new = torch.stack(
            [
                _set_row_col(gram[0], j, ss_row, ss_row),
                _set_row_col(gram[1], j, ys_row, sy_col),  # [j, :] = s_j.y_i ; [:, j] = s_i.y_j
                _set_row_col(gram[2], j, yy_row, yy_row),
            ]
        )
        gram.copy_(torch.where(accept[b], new, gram))
        roll = due[b].to(arena.dtype)
        flat["param_snapshot"][sl].lerp_(flat["param_ema"][sl], roll)
        flat["grad_snapshot"][sl].lerp_(flat["grad_ema"][sl], roll)
    pair_count += accept
    arena.counters["skipped_pairs"] += forms_pair & accept.logical_not()


def _scalar(value: float | Tensor, arena: Arena) -> Tensor:
    """A hyperparameter as a 0-dim tensor in the arena's dtype. ``torch.full`` is a
    fill kernel, not a host-to-device copy, so this is safe inside CUDA graph capture;
    and it keeps float64 hyperparameters float64 (``torch.where`` on two Python
    floats would give float32)."""
    if isinstance(value, Tensor):  # a 1-element lr of any shape, e.g. [1, 1]
        return value.to(device=arena.device, dtype=arena.dtype).reshape(())
    return torch.full((), value, dtype=arena.dtype, device=arena.device)


def _rings(arena: Arena, b: int) -> tuple[Tensor, Tensor]:
    """The block's history rings ``[m, n_b]`` as stored."""
    return arena.history_view(arena.history_s, b), arena.history_view(arena.history_y, b)


# Note [reductions in float32 or wider]
# The single dots (g.g, which is also the step's finiteness probe, and a pair's s.s,
# s.y, s.yhat) accumulate float64 products for every dtype (:func:`_dot`), as the
# fused backends do, so a finite gradient is never taken for a non-finite one.
# Float32 and float64 vectors meet rings of their own dtype in one BLAS call each.
# Anything narrower (float16/bfloat16 parameters, or a ring stored narrower than the
# parameters) goes through the helpers below in column chunks of _CHUNK elements,
# each chunk widened to float32 (float64 for float64 parameters): the sums never
# overflow or accumulate in 16 bits, and the widened copies stay bounded by
# m * _CHUNK elements whatever N is.
_CHUNK = 1 << 16


def _direct(R: Tensor, x: Tensor) -> bool:
    return R.dtype == x.dtype and x.dtype in (torch.float32, torch.float64)


def _wide(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _chunks(n: int):
    for lo in range(0, n, _CHUNK):
        yield slice(lo, min(n, lo + _CHUNK))


def _dot(x: Tensor, y: Tensor, wide: Tensor) -> Tensor:
    """``x.y`` as a 0-dim float64 tensor, accumulated in float64 from float64 products
    (float32 products of finite entries above about 1e19 would overflow): through the
    ``[2, _CHUNK]`` float64 scratch ``wide``, no allocation."""
    if x.dtype == torch.float64:
        return x.dot(y)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for ch in _chunks(x.numel()):
        n = ch.stop - ch.start
        a = wide[0, :n].copy_(x[ch])
        b = a if y is x else wide[1, :n].copy_(y[ch])
        total += a.dot(b)
    return total


def _ring_dots(R: Tensor, x: Tensor) -> Tensor:
    """``R x`` (``[m]`` float64) for a ring ``R`` ``[m, n]``."""
    if _direct(R, x):
        return (R @ x).double()
    wide = _wide(x.dtype)
    total = torch.zeros(R.shape[0], dtype=torch.float64, device=x.device)
    for ch in _chunks(x.numel()):
        total += (R[:, ch].to(wide) @ x[ch].to(wide)).double()
    return total


def _add_ring_combination(x: Tensor, R: Tensor, c: Tensor) -> None:
    """``x += R^T c`` in place (``c`` ``[m]``, float64)."""
    if _direct(R, x):
        x.addmv_(R.t(), c.to(x.dtype))
        return
    wide = _wide(x.dtype)
    for ch in _chunks(x.numel()):
        x[ch].add_(R[:, ch].to(wide).t() @ c.to(wide))


def _combine(d: Tensor, g: Tensor, S: Tensor, Y: Tensor, c_g: Tensor, c_s: Tensor, c_y: Tensor) -> None:
    """``d = c_g g + S^T c_s + Y^T c_y``, in float32 or wider, rounded once on store."""
    if _direct(S, g):
        torch.mul(g, c_g.to(g.dtype), out=d)
        d.addmv_(S.t(), c_s.to(g.dtype)).addmv_(Y.t(), c_y.to(g.dtype))
        return
    wide = _wide(g.dtype)
    c_g, c_s, c_y = c_g.to(wide), c_s.to(wide), c_y.to(wide)
    for ch in _chunks(g.numel()):
        part = g[ch].to(wide) * c_g
        part.addmv_(S[:, ch].to(wide).t(), c_s).addmv_(Y[:, ch].to(wide).t(), c_y)
        d[ch].copy_(part)


def _set_row_col(mat: Tensor, j: Tensor, row: Tensor, col: Tensor) -> Tensor:
    return mat.index_copy(0, j, row.unsqueeze(0)).index_copy(1, j, col.unsqueeze(1))
