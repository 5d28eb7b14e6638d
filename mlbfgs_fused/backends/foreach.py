"""The portable backend: the mL-BFGS step with ``torch._foreach_*`` and flat tensor ops.

Works on any device. It never reads a device value on the host: every
data-dependent decision of DESIGN.md section 2 (the non-finite step, the warm-up,
normalisation, whether this is a pair-update step, damping, pair skipping) is a
mask or a factor in tensor arithmetic, chosen so that a masked-off update is an
exact identity (``x * 1``, ``x + 0``, ``lerp`` with weight 0). The pair update is
therefore computed every step and applied only when due; the Triton backend skips
it on the device instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import check_gradients  # noqa: F401 -- an entry point
from .._state.arena import Arena
from .._math import damping_factor, two_loop_coefficients


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
        gather_gradient(step, group["weight_decay"], group["maximize"])
        dots = _gradient_dots(arena)
        arena.pending_step = (step, dots)
        probes.append(dots[2].sum())
    return probes


def finish(arenas: list[Arena], group: dict, ok: dict, amp) -> None:
    pending = [arena.pending_step for arena in arenas]
    d_dot_d = [
        direction(arena, ok[arena.device], dots) for arena, (_, dots) in zip(arenas, pending)
    ]
    home = arenas[0].device
    d_scale = group_direction_scale(arenas, d_dot_d, group["normalize"], home)
    for (step, _), arena in zip(pending, arenas):
        arena.pending_step = None
        ok_here = ok[arena.device]
        apply_update(step, group, ok_here, d_scale.to(arena.device, arena.dtype))
        if arena.counter_probe is None:
            arena.counter_probe = CounterProbe(arena.device)
        # Under capture the host's knowledge would be frozen into the graph.
        if group["capturable"] or arena.counter_probe.pair_update_possible(group["update_period"]):
            push_pairs(arena, group, ok_here)
        if not group["capturable"]:
            arena.counter_probe.record(arena.counters["step"][0])


def group_direction_scale(
    arenas: list[Arena], d_dot_d: list[Tensor], normalize: bool, home: torch.device
) -> Tensor:
    """``1 / ||d||`` over the whole group once any block holds a pair (docs/design.md,
    the step, 4), else 1; 1 as well when ``||d|| = 0``."""
    one = torch.ones((), dtype=torch.float64, device=home)
    if not normalize:
        return one
    norm = torch.stack([x.sum().to(home) for x in d_dot_d]).sum().sqrt()
    any_held = torch.stack([(a.counters["pair_count"] > 0).any().to(home) for a in arenas]).any()
    return torch.where(any_held & (norm > 0), one / torch.where(norm > 0, norm, one), one)


class GroupStep:
    """Per-step views of one arena: which parameters have a gradient, and
    lists of matching per-parameter views for the ``_foreach`` ops."""

    def __init__(self, arena: Arena):
        self.arena = arena
        self.present = [i for i, p in enumerate(arena.params) if p.grad is not None]
        self.all_present = len(self.present) == len(arena.params)
        self.params = [arena.params[i] for i in self.present]
        self.grads = [arena.params[i].grad for i in self.present]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Views of a flat arena buffer over the parameters that have gradients."""
        if self.all_present:
            return [flat]
        return [self.arena.param_view(flat, i) for i in self.present]

    def shaped_views(self, flat: Tensor) -> list[Tensor]:
        return [self.arena.param_view(flat, i) for i in self.present]


def gather_gradient(step: GroupStep, weight_decay: float, maximize: bool) -> None:
    """``g = grad + weight_decay * theta`` (negated under ``maximize``) into the
    arena's flat scratch, zero where a parameter has no gradient."""
    g = step.arena.grad_flat
    if not step.all_present:
        g.zero_()
    g_views = step.shaped_views(g)
    torch._foreach_copy_(g_views, step.grads)
    if weight_decay != 0:
        torch._foreach_add_(g_views, step.params, alpha=weight_decay)
    if maximize:
        g.neg_()


def _gradient_dots(arena: Arena) -> tuple[Tensor, Tensor, Tensor]:
    """``S g``, ``Y g`` (``[B, m]``) and ``g.g`` (``[B]``) per block, in float64.
    ``g.g`` doubles as the finiteness flag: it is finite iff ``g`` is (barring overflow)."""
    g = arena.grad_flat
    B, m = arena.layout.num_blocks, arena.m
    Sg = torch.empty(B, m, dtype=torch.float64, device=arena.device)
    Yg = torch.empty_like(Sg)
    gg = torch.empty(B, dtype=torch.float64, device=arena.device)
    for b in range(B):
        g_b = g[arena.block_slice(b)]
        S, Y = _history(arena, b)
        Sg[b] = S @ g_b
        Yg[b] = Y @ g_b
        gg[b] = g_b.dot(g_b)
    return Sg, Yg, gg


def direction(arena: Arena, ok: Tensor, dots: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Write ``d = H g`` per block into ``arena.work``; return ``||d_b||^2`` per block.

    A non-finite step has its gradient and dots zeroed first, so it produces
    ``d = 0`` and no NaN reaches any state through a masked product.
    """
    g, d = arena.grad_flat, arena.work
    not_ok = ok.logical_not()
    g.masked_fill_(not_ok, 0.0)
    Sg, Yg, gg = (x.masked_fill(not_ok, 0.0) for x in dots)
    c_g, c_s, c_y, _ = two_loop_coefficients(arena.gram, Sg, Yg, gg, arena.counters["pair_count"])
    c_g, c_s, c_y = c_g.to(arena.dtype), c_s.to(arena.dtype), c_y.to(arena.dtype)
    B = arena.layout.num_blocks
    d_dot_d = torch.empty(B, dtype=torch.float64, device=arena.device)
    for b in range(B):
        sl = arena.block_slice(b)
        S, Y = _history(arena, b)
        d_b = d[sl]
        torch.mul(g[sl], c_g[b], out=d_b)
        d_b.addmv_(S.t(), c_s[b]).addmv_(Y.t(), c_y[b])
        d_dot_d[b] = d_b.dot(d_b)
    return d_dot_d


def apply_update(step: GroupStep, group: dict, ok: Tensor, d_scale: Tensor) -> None:
    """EMAs, heavy ball and the parameter write, each an identity when ``ok`` is False."""
    arena = step.arena
    flat = arena.flat_state
    beta_p, beta_g = group["ema_decay"]
    first = arena.counters["step"][0] == 0
    one = torch.ones((), dtype=arena.dtype, device=arena.device)
    zero = torch.zeros((), dtype=arena.dtype, device=arena.device)
    # The EMAs start at their first sample: weight 1 at the first step, 0 on a skipped one.
    w_param = torch.where(ok, torch.where(first, one, 1 - beta_p), zero)
    w_grad = torch.where(ok, torch.where(first, one, 1 - beta_g), zero)
    momentum = torch.where(ok, group["momentum"], one)
    lr = _scalar(group["lr"], arena)
    neg_lr = torch.where(ok, -lr, zero)

    d = arena.work
    d.mul_(torch.where(ok, d_scale, zero))
    p_ema = step.shaped_views(flat["param_ema"])
    torch._foreach_lerp_(p_ema, step.params, [w_param] * len(p_ema))
    g_ema = step.views(flat["grad_ema"])
    torch._foreach_lerp_(g_ema, step.views(arena.grad_flat), [w_grad] * len(g_ema))
    buf = step.views(flat["momentum_buffer"])
    torch._foreach_mul_(buf, momentum)
    torch._foreach_add_(buf, step.views(d))
    # theta -= lr * buf, with lr * buf formed in the (now free) work buffer.
    torch.mul(flat["momentum_buffer"], neg_lr, out=d)
    torch._foreach_add_(step.params, step.shaped_views(d))
    arena.counters["step"].add_(ok)
    arena.counters["skipped_steps"].add_(ok.logical_not())


def push_pairs(arena: Arena, group: dict, ok: Tensor) -> None:
    """DESIGN.md section 2 step 7 for every block, applied where due (masked)."""
    T, r, eps = group["update_period"], group["pair_momentum"], group["eps"]
    m = arena.m
    flat = arena.flat_state
    t = arena.counters["step"]
    pair_count = arena.counters["pair_count"]
    due = ok & (torch.remainder(t, T) == 0)
    forms_pair = due & (t > T)  # snapshots exist from the first update on
    r_value = _scalar(r, arena)
    s_all, y_all = arena.work, arena.grad_flat
    torch.sub(flat["param_ema"], flat["param_snapshot"], out=s_all)
    torch.sub(flat["grad_ema"], flat["grad_snapshot"], out=y_all)
    for b in range(arena.layout.num_blocks):
        sl = arena.block_slice(b)
        s, y = s_all[sl], y_all[sl]
        S, Y = _history(arena, b)
        newest = torch.remainder(pair_count[b] - 1, m).view(1)
        r_eff = torch.where(pair_count[b] > 0, r_value, 0.0)
        s.lerp_(S.index_select(0, newest)[0], r_eff)
        y.lerp_(Y.index_select(0, newest)[0], r_eff)
        s_dot_y, s_dot_s = s.dot(y).double(), s.dot(s).double()
        phi = damping_factor(
            s_dot_y, s_dot_s, group["sigma_low"], group["sigma_high"], group["damping"], eps
        )
        torch.lerp(s, y, phi.to(arena.dtype), out=y)  # y <- yhat = phi y + (1 - phi) s
        curvature = s.dot(y).double()
        accept = forms_pair[b] & torch.isfinite(curvature) & (curvature > eps)

        slot = torch.remainder(pair_count[b], m).view(1)
        s_row = torch.where(accept, s, S.index_select(0, slot)[0].to(arena.dtype))
        y_row = torch.where(accept, y, Y.index_select(0, slot)[0].to(arena.dtype))
        arena.history_view(arena.history_s, b).index_copy_(0, slot, s_row.unsqueeze(0).to(arena.history_dtype))
        arena.history_view(arena.history_y, b).index_copy_(0, slot, y_row.unsqueeze(0).to(arena.history_dtype))
        S, Y = _history(arena, b)  # re-read: the rows as stored (rounded when narrower)
        rows = torch.stack([S.index_select(0, slot)[0], Y.index_select(0, slot)[0]], dim=1)
        gram = arena.gram[b]
        # One read of each ring gives the new row and column of all three Gram matrices.
        ss_row, sy_col = (S @ rows).double().unbind(1)
        ys_row, yy_row = (Y @ rows).double().unbind(1)
        new = torch.stack(
            [
                _set_row_col(gram[0], slot, ss_row, ss_row),
                _set_row_col(gram[1], slot, ys_row, sy_col),  # [j, :] = s_j.y_i ; [:, j] = s_i.y_j
                _set_row_col(gram[2], slot, yy_row, yy_row),
            ]
        )
        gram.copy_(torch.where(accept, new, gram))
        pair_count[b] += accept
        arena.counters["skipped_pairs"][b] += forms_pair[b] & accept.logical_not()
        roll = due[b].to(arena.dtype)
        flat["param_snapshot"][sl].lerp_(flat["param_ema"][sl], roll)
        flat["grad_snapshot"][sl].lerp_(flat["grad_ema"][sl], roll)


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


def _history(arena: Arena, b: int) -> tuple[Tensor, Tensor]:
    """The block's rings in the compute dtype (a copy when the history is stored narrower)."""
    S = arena.history_view(arena.history_s, b)
    Y = arena.history_view(arena.history_y, b)
    if S.dtype != arena.dtype:
        S, Y = S.to(arena.dtype), Y.to(arena.dtype)
    return S, Y


def _set_row_col(mat: Tensor, j: Tensor, row: Tensor, col: Tensor) -> Tensor:
    return mat.index_copy(0, j, row.unsqueeze(0)).index_copy(1, j, col.unsqueeze(1))
