"""The portable backend: the mL-BFGS step with ``torch._foreach_*`` and flat tensor ops.

Works on any device. It never reads a device value on the host: every
data-dependent decision of docs/design.md ("The step": the non-finite step, the
warm-up, normalisation, whether this is a pair-update step, damping, pair skipping)
is a mask or a factor in tensor arithmetic, chosen so that a masked-off update is an
exact identity (``x * 1``, ``x + 0``, ``lerp`` with weight 0). The pair update runs
(masked) only on steps where the host's :class:`CounterProbe` says a pair can be due.

Order per arena (the reference, mlbfgs_fused/reference/mlbfgs.py, defines it):
``gradient_dots`` gathers ``g`` and takes ``S g``, ``Y g``, ``g.g``; ``finish`` finds
the coefficients of ``d`` and ``||d||`` from the Gram matrices, writes ``d``
already normalised into ``work``, then the averages, heavy ball and parameter write,
then the pair update. Under ``variant="released"`` a possible pair step first updates
the averages and pushes the pair, gathers ``g`` again (the push used its scratch),
resets the gradient average and takes the dots with the new pair.

Memory: besides the arena's two scratch vectors (``grad_flat`` and ``work``) no step
allocates anything parameter-sized for float32/float64 data; 16-bit data goes
through bounded chunks (Note [reductions in float32 or wider]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_gradients  # noqa: F401 -- an entry point
from .._state.arena import Arena
from .._math import NORMALIZE_NEVER, damping_factor, direction_scale, normalize_mode, two_loop_coefficients


def available() -> bool:
    return True


def supported_devices() -> list[str]:
    return ["cpu", "cuda", "mps", "xpu", "meta"]


def prepare(arenas: list[Arena], group: dict) -> bool:
    return any(p.grad is not None for p in group["params"])


def gradient_dots(arenas: list[Arena], group: dict, amp) -> list[Tensor]:
    """Gather ``g`` and compute ``S g``, ``Y g``, ``g.g`` per block; keep them for :func:`finish`."""
    probes = []
    for arena in arenas:
        step = GroupStep(arena)
        gather_gradient(step, group["weight_decay"], group["maximize"], _grad_scale(amp, arena))
        dots = _gradient_dots(arena)
        arena.pending_step = (step, dots)
        probes.append(dots[2].sum())
    return probes


def finish(arenas: list[Arena], group: dict, ok: dict, amp) -> None:
    """The rest of the step in the order of the reference (mlbfgs_fused/reference/mlbfgs.py):
    under ``variant="released"`` a due step updates the averages and pushes the pair
    before the direction is formed (E4); otherwise after the parameter write."""
    released = group["variant"] == "released"
    T = group["update_period"]
    coefficients, pair_steps = [], []
    for arena in arenas:
        step, dots = arena.pending_step
        ok_here = ok[arena.device]
        if arena.counter_probe is None:
            arena.counter_probe = CounterProbe(arena.device)
        # Under capture the host's knowledge would be frozen into the graph.
        pair_step = group["capturable"] or arena.counter_probe.pair_update_possible(T)
        pair_steps.append(pair_step)
        if released and pair_step:
            # A masked-off product must never meet a NaN: zero g of a non-finite step.
            arena.grad_flat.masked_fill_(ok_here.logical_not(), 0.0)
            update_averages(step, group, ok_here)
            t_new = arena.counters["step"] + ok_here  # this step's t (the counter moves later)
            push_pairs(arena, group, ok_here, t_new)  # uses g's scratch: gather g again
            gather_gradient(step, group["weight_decay"], group["maximize"], _grad_scale(amp, arena))
            arena.grad_flat.masked_fill_(ok_here.logical_not(), 0.0)
            reset_grad_average(step, ok_here & (torch.remainder(t_new[0], T) == 0))
            dots = _gradient_dots(arena)  # with the pair just pushed
        coefficients.append(direction(arena, ok_here, dots))
    home = arenas[0].device
    d_scale = group_direction_scale(arenas, [c[3] for c in coefficients], group["normalize"], home)
    for arena, pair_step, coeffs in zip(arenas, pair_steps, coefficients):
        step, _ = arena.pending_step
        arena.pending_step = None
        ok_here = ok[arena.device]
        write_direction(arena, coeffs, torch.where(ok_here, d_scale.to(arena.device), 0.0))
        apply_update(step, group, ok_here, averages=not (released and pair_step))
        if pair_step and not released:
            push_pairs(arena, group, ok_here, arena.counters["step"])
        if not group["capturable"]:
            arena.counter_probe.record(arena.counters["step"][0])


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


class GroupStep:
    """Per-step views of one arena: which parameters have a gradient, and
    lists of matching per-parameter views for the ``_foreach`` ops."""

    def __init__(self, arena: Arena):
        self.arena = arena
        self.present = [i for i, p in enumerate(arena.params) if p.grad is not None]
        self.all_present = len(self.present) == len(arena.params)
        # The tensors stepped: the parameters, or a distributed rank's pieces of them.
        self.params = [arena.local_param(i) for i in self.present]
        self.grads = [arena.local_grad(i) for i in self.present]
        if not self.present:  # nothing to write here; _foreach ops take no empty list
            self.params = self.grads = [arena.grad_flat[:0]]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat arena buffer over the parameters that have gradients."""
        if self.all_present:
            return [flat]
        return self.shaped_views(flat)

    def shaped_views(self, flat: Tensor) -> list[Tensor]:
        if not self.present:
            return [flat[:0]]
        return [self.arena.param_view(flat, i) for i in self.present]


def _grad_scale(amp, arena: Arena) -> Tensor | None:
    """The scale the gradients still carry (``GradScaler``), on the arena's device."""
    if amp is None or amp.grad_scale is None:
        return None
    return amp.grad_scale.to(arena.device, non_blocking=True)


def gather_gradient(
    step: GroupStep, weight_decay: float, maximize: bool, grad_scale: Tensor | None = None
) -> None:
    """``g = grad / grad_scale`` (negated under ``maximize``) ``+ weight_decay * theta``
    into the arena's flat scratch, zero where a parameter has no gradient. ``.grad`` is
    only read: a ``GradScaler``'s scale is divided out here, never in place."""
    g = step.arena.grad_flat
    if not step.all_present:
        g.zero_()
    g_views = step.shaped_views(g)
    torch._foreach_copy_(g_views, step.grads)
    if grad_scale is not None:
        torch._foreach_div_(g_views, grad_scale)
    if maximize:
        g.neg_()
    if weight_decay != 0:
        torch._foreach_add_(g_views, step.params, alpha=weight_decay)


def _gradient_dots(arena: Arena) -> tuple[Tensor, Tensor, Tensor]:
    """``S g``, ``Y g`` (``[B, m]``) and ``g.g`` (``[B]``) per block, in float64.
    ``g.g`` doubles as the finiteness flag: it is finite iff ``g`` is (accumulated in
    float32 or wider, so a finite half-precision gradient never overflows it)."""
    g = arena.grad_flat
    B, m = arena.layout.num_blocks, arena.m
    # One [B, 2m + 1] tensor, so that a distributed rank completes it in one collective.
    dots = torch.empty(B, 2 * m + 1, dtype=torch.float64, device=arena.device)
    Sg, Yg, gg = dots[:, :m], dots[:, m : 2 * m], dots[:, 2 * m]
    for b in range(B):
        g_b = g[arena.block_slice(b)]
        S, Y = _rings(arena, b)
        Sg[b] = _ring_dots(S, g_b)
        Yg[b] = _ring_dots(Y, g_b)
        gg[b] = _dot(g_b, g_b, arena.wide)
    arena.block_sum(dots)
    return Sg, Yg, gg


def direction(arena: Arena, ok: Tensor, dots: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
    """The coefficients of ``d = H g`` per block (``c_g``, ``c_s``, ``c_y``) and ``||d_b||^2``,
    found on scalars from the Gram matrices (vector-free): ``d`` is written only once
    its group scale is known (:func:`write_direction`), so a 16-bit ``d`` is stored
    normalised and never overflows on the way.

    A non-finite step has its gradient and dots zeroed first, so it produces
    ``d = 0`` and no NaN reaches any state through a masked product.
    """
    not_ok = ok.logical_not()
    arena.grad_flat.masked_fill_(not_ok, 0.0)
    Sg, Yg, gg = (x.masked_fill(not_ok, 0.0) for x in dots)
    c_g, c_s, c_y, d_dot_d = two_loop_coefficients(arena.gram, Sg, Yg, gg, arena.counters["pair_count"])
    return c_g, c_s, c_y, d_dot_d.clamp(min=0.0)  # rounding must not make a norm NaN


def write_direction(arena: Arena, coefficients: tuple[Tensor, ...], scale: Tensor) -> None:
    """``work = scale * (c_g g + S^T c_s + Y^T c_y)`` per block; ``scale`` is 0 on a
    skipped step."""
    c_g, c_s, c_y, _ = coefficients
    c_g, c_s, c_y = c_g * scale, c_s * scale, c_y * scale
    g, d = arena.grad_flat, arena.work
    for b in range(arena.layout.num_blocks):
        sl = arena.block_slice(b)
        S, Y = _rings(arena, b)
        _combine(d[sl], g[sl], S, Y, c_g[b], c_s[b], c_y[b])


def update_averages(step: GroupStep, group: dict, ok: Tensor) -> None:
    """The averages of the parameters and gradients, with the parameters before this
    step's write; an identity when ``ok`` is False. ``variant="paper"``:
    ``P = beta_p P + (1 - beta_p) theta`` (a lerp); ``"released"``: ``P = beta_p P + theta``.
    Both start at their first sample."""
    arena = step.arena
    flat = arena.flat_state
    first = arena.counters["step"][0] == 0
    one = torch.ones((), dtype=arena.dtype, device=arena.device)
    zero = torch.zeros((), dtype=arena.dtype, device=arena.device)
    p_ema = step.shaped_views(flat["param_ema"])
    g_ema = step.views(flat["grad_ema"])
    g = step.views(arena.grad_flat)
    for beta, average, sample in zip(group["ema_decay"], (p_ema, g_ema), (step.params, g)):
        if group["variant"] == "released":
            decay = torch.where(ok, torch.where(first, zero, beta), one)
            torch._foreach_mul_(average, decay)
            torch._foreach_addcmul_(average, sample, [torch.where(ok, one, zero)] * len(average))
        else:
            weight = torch.where(ok, torch.where(first, one, 1 - beta), zero)
            torch._foreach_lerp_(average, sample, [weight] * len(average))


def reset_grad_average(step: GroupStep, due: Tensor) -> None:
    """``variant="released"`` (E2): ``G = g`` at a pair step, after the snapshots."""
    weight = due.to(step.arena.dtype)
    g_ema = step.views(step.arena.flat_state["grad_ema"])
    torch._foreach_lerp_(g_ema, step.views(step.arena.grad_flat), [weight] * len(g_ema))


def apply_update(step: GroupStep, group: dict, ok: Tensor, averages: bool = True) -> None:
    """Averages (unless already done), heavy ball with the direction in ``work`` and the
    parameter write, each an identity when ``ok`` is False."""
    arena = step.arena
    flat = arena.flat_state
    one = torch.ones((), dtype=arena.dtype, device=arena.device)
    zero = torch.zeros((), dtype=arena.dtype, device=arena.device)
    momentum = torch.where(ok, group["momentum"], one)
    lr = _scalar(group["lr"], arena)
    neg_lr = torch.where(ok, -lr, zero)

    d = arena.work
    if averages:
        update_averages(step, group, ok)
    buf = step.views(flat["momentum_buffer"])
    torch._foreach_mul_(buf, momentum)
    torch._foreach_add_(buf, step.views(d))
    # theta -= lr * buf, with lr * buf formed in the (now free) work buffer.
    torch.mul(flat["momentum_buffer"], neg_lr, out=d)
    torch._foreach_add_(step.params, step.shaped_views(d))
    arena.counters["step"].add_(ok)
    arena.counters["skipped_steps"].add_(ok.logical_not())


def push_pairs(arena: Arena, group: dict, ok: Tensor, t: Tensor | None = None) -> None:
    """The pair update of docs/design.md (the step, 7) for every block, applied where
    due (masked), ``t`` being this step's index per block. ``s`` and ``y`` are formed in
    the two scratch vectors (``work`` and the gathered gradient, which this overwrites);
    the ring rows are read at device-side slots through one-hot matrix-vector products,
    so no parameter-sized temporary is allocated (one per block in the history dtype
    when ``history_dtype`` differs from the parameters', to round the new row)."""
    T, r, eps = group["update_period"], group["pair_momentum"], group["eps"]
    m = arena.m
    flat = arena.flat_state
    pair_count = arena.counters["pair_count"]
    t = arena.counters["step"] if t is None else t
    due = ok & (torch.remainder(t, T) == 0)
    forms_pair = due & (t > T)  # snapshots exist from the first update on
    s_all, y_all = arena.work, arena.grad_flat
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
        sums[b, 0], sums[b, 1] = _dot(s, y, arena.wide), _dot(s, s, arena.wide)
    s_dot_y, s_dot_s = arena.block_sum(sums).unbind(1)
    phi = damping_factor(s_dot_y, s_dot_s, group["sigma_low"], group["sigma_high"], group["damping"], eps)
    curvature = torch.empty(B, dtype=torch.float64, device=arena.device)
    for b in range(B):
        sl = arena.block_slice(b)
        s, y = s_all[sl], y_all[sl]
        torch.lerp(s, y, phi[b].to(arena.dtype), out=y)  # y <- yhat = phi y + (1 - phi) s
        curvature[b] = _dot(s, y, arena.wide)
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


class CounterProbe:
    """What the host knows of an arena's step counter without waiting for the device.

    After each step the counter is copied to host memory (pinned and non-blocking
    on CUDA, with an event marking completion). At the next step, if that copy has
    landed, the host has a lower bound ``t0`` on the counter and the number of steps
    run since; the counter can only have grown by the finite ones among them. So a
    pair update is possible at this step only if a multiple of ``update_period``
    lies in the range the counter can reach, and the (masked) pair update is run
    only then: every ``update_period`` steps instead of every step. Nothing ever
    waits: a copy still in flight counts as "unknown" and the pair update runs.
    On the CPU every copy has landed by the time it returns.
    """

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.host = torch.zeros((), dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.calls = 0  # steps run on this arena
        self.calls_at_copy: int | None = None  # None: no copy issued yet

    def _landed(self) -> bool:
        return self.calls_at_copy is not None and (self.event is None or self.event.query())

    def pair_update_possible(self, update_period: int) -> bool:
        """Called once per step, before the pair update."""
        self.calls += 1
        if not self._landed():
            return True
        t0 = int(self.host.tolist())  # host memory whose copy is complete: no device read
        since = self.calls - 1 - self.calls_at_copy
        highest = t0 + since + 1  # the counter after this step, if every step was finite
        return highest // update_period > t0 // update_period

    def record(self, counter: Tensor) -> None:
        """Called once per step, after the counter was updated."""
        if self.calls_at_copy is not None and not self._landed():
            return  # the previous copy is still in flight: keep it, never wait
        self.host.copy_(counter, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.calls_at_copy = self.calls


def _scalar(value: float | Tensor, arena: Arena) -> Tensor:
    """A hyperparameter as a 0-dim tensor in the arena's dtype. ``torch.full`` is a
    fill kernel, not a host-to-device copy, so this is safe inside CUDA graph capture;
    and it keeps float64 hyperparameters float64 (``torch.where`` on two Python
    floats would give float32)."""
    if isinstance(value, Tensor):
        return value.to(device=arena.device, dtype=arena.dtype)
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
