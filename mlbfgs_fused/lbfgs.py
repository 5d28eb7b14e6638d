"""``LBFGS``: a drop-in for ``torch.optim.LBFGS`` with flat state and a vector-free two-loop."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from ._line_search import Point, _strong_wolfe

__all__ = ["LBFGS"]

# The settings that shape the one quasi-Newton model and its loop: the same in every group.
_GLOBAL_KEYS = ("max_iter", "max_eval", "max_eval_given", "tolerance_grad", "tolerance_change",
                "history_size", "line_search_fn", "maximize")
_CURVATURE_MIN = 1e-10  # torch's rule: a pair is stored only when s.y > 1e-10


class LBFGS(Optimizer):
    r"""L-BFGS with torch's constructor, closure protocol and algorithm.

    ``torch.optim.LBFGS`` code changes only its import: the same termination
    rules, the same strong-Wolfe line search (cubic interpolation, ``c1 = 1e-4``,
    ``c2 = 0.9``), a pair ``(s, y)`` stored only when ``s.y > 1e-10``, ``H0 = s.y / y.y``
    of the newest pair, a first step of ``min(1, 1 / |g|_1) * lr``, and the counters
    ``n_iter`` and ``func_evals`` in ``state[first_param]``. Underneath, the state
    is flat (per group, device and dtype: the history ring, the direction and the
    previous gradient), the two-loop recursion runs on the Gram matrix of the
    history (docs/design.md, "LBFGS" and "The vector-free two-loop"): two passes
    over the ring per iteration and no host synchronisation inside it; trial
    points are written into the parameters in place. The host reads one small
    vector per closure evaluation (the loss and the line-search scalars) and one
    per direction.

    ``state[first_param]`` holds ``func_evals``, ``n_iter``, ``t``, ``prev_loss`` as torch
    does, and the model (``gram``, the ``[2m, 2m + 1]`` dots of the ring with the ring
    and the gradient, ``pair_count``, ``direction_coefficients``, ``staged_alpha``); the first parameter of each
    (group, device, dtype) holds its slice of the ring (``history_s``,
    ``history_y``, ``[m, n]``), every parameter its slice of ``direction`` and
    ``prev_grad``. torch's own keys (``d``, ``old_dirs``, ...) are not kept, so
    checkpoints do not move between the two classes.

    Beyond torch:

    - Several parameter groups: one quasi-Newton model over all parameters; a
      group's ``lr`` scales its part of every step (relative to the first
      group's, which plays torch's ``lr``). Loop settings (``max_iter``,
      ``max_eval``, the tolerances, ``history_size``, ``line_search_fn``,
      ``maximize``) must be the same in every group.
    - Parameters on several devices and dtypes (float32, float64).
    - ``maximize``.
    - ``max_eval`` holds exactly, also inside the line search.
    - A trial point whose loss or gradient is not finite is a failed trial: the
      line search backs off (without one, the step is halved until the point is
      finite or ``max_eval`` is reached, then undone); it never enters the history.
      A step that starts at a non-finite point returns without changing anything.
    - Under ``torch.distributed`` (when initialised), the scalars the host reads
      are averaged over the ranks before any decision, so every rank makes the
      same decisions and runs the closure the same number of times (the closure
      averages the gradients, as DDP does).

    Args:
        params: an iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default: 1).
        max_iter: maximal number of iterations per optimization step (default: 20).
        max_eval: maximal number of function evaluations per optimization step
            (default: max_iter * 1.25).
        tolerance_grad: termination tolerance on first order optimality (default: 1e-7).
        tolerance_change: termination tolerance on function value/parameter changes
            (default: 1e-9).
        history_size: update history size (default: 100).
        line_search_fn: either 'strong_wolfe' or None (default: None).
        maximize: maximise the objective (default: False).
        foreach: accepted for symmetry with ``torch.optim``; the portable path
            uses ``torch._foreach_*`` ops (default: None).
        fused: fused kernels for LBFGS are not available yet; ``True`` raises.
        backend: ``None`` or ``"foreach"``.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        backend: str | None = None,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if backend is not None:
            backends.get(backend)  # raises, naming the registered backends
        if fused or backend not in (None, "foreach"):
            raise NotImplementedError(
                "LBFGS runs on the foreach backend only for now (fused LBFGS kernels are not built yet)"
            )
        if line_search_fn not in (None, "strong_wolfe"):
            raise RuntimeError("only 'strong_wolfe' is supported")
        for name, value, least in (("max_iter", max_iter, 0), ("history_size", history_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Invalid {name} value: {value}")
        max_eval_given = max_eval is not None
        if not max_eval_given:
            max_eval = max_iter * 5 // 4  # torch's default, with torch's meaning (see step)
        elif isinstance(max_eval, bool) or not isinstance(max_eval, int) or max_eval < 1:
            raise ValueError(f"Invalid max_eval value: {max_eval}")
        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            max_eval_given=max_eval_given,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            backend=backend,
        )
        self._arenas: list[_Arena] | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        for key in _GLOBAL_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"LBFGS takes '{key}' once for all parameter groups: a group sets "
                    f"{param_group[key]!r}, the optimizer {self.defaults[key]!r}"
                )
        lr = param_group.get("lr", self.defaults["lr"])
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"LBFGS optimizes float32 and float64 parameters, got {p.dtype}")
        self._arenas = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._arenas = None

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts all state to the parameter's dtype; the model's Gram matrix stays
        # float64 and its pair counter int64.
        model = next((s for s in state_dict["state"].values() if "gram" in s), None)
        super().load_state_dict(state_dict)
        if model is not None:
            first = self.state[self._first_param()]
            for key in ("gram", "pair_count", "direction_coefficients", "ring_grad_dots"):
                if key in model:  # ring_grad_dots: a checkpoint of version 0.1 (see _upgrade_gram)
                    first[key] = model[key].to(first[key].device).clone()
        self._arenas = None

    # -- state ------------------------------------------------------------------
    def _first_param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _build_arenas(self) -> list[_Arena]:
        """Arenas per (group, device, dtype), adopting whatever ``self.state`` holds."""
        m = self.defaults["history_size"]
        arenas = []
        for index, group in enumerate(self.param_groups):
            kinds: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                kinds.setdefault((p.device, p.dtype), []).append(p)
            arenas.extend(_Arena(params, m, index, self.state) for params in kinds.values())
        first = self.state[self._first_param()]
        home = arenas[0].device
        if "gram" not in first:
            first["gram"] = _empty_gram(m, home)
            first["pair_count"] = torch.zeros((), dtype=torch.int64, device=home)
        if tuple(first["gram"].shape) == (3, m, m):
            # Saved before any direction was formed, it has no ring_grad_dots: the ring was empty.
            ring_grad_dots = first.pop("ring_grad_dots", first["gram"].new_zeros(2 * m))
            first["gram"] = _upgrade_gram(first["gram"], ring_grad_dots, first["pair_count"])
        if tuple(first["gram"].shape) != (2 * m, 2 * m + 1):
            raise ValueError(
                f"loaded state 'gram' has shape {tuple(first['gram'].shape)}, expected {(2 * m, 2 * m + 1)}"
            )
        for key in ("gram", "pair_count", "direction_coefficients"):
            if key in first:
                first[key] = first[key].to(home)
        return arenas

    # -- host reads -------------------------------------------------------------
    def _to_host(self, values: list[Tensor], home: torch.device) -> list[float]:
        """The one device-to-host copy of a closure evaluation (or of a direction):
        the values stacked, averaged over the ranks when distributed, read at once."""
        vec = torch.stack([v if v.device == home else v.to(home) for v in values])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                vec = vec.double()
                torch.distributed.all_reduce(vec)
                vec /= world
        return vec.tolist()

    def _evaluate(self, closure, arenas, want_gtd: bool, want_l1: bool):
        """Run the closure, gather the gradient into ``g`` (negated under ``maximize``);
        read loss, ``g.D``, ``max |g|`` (and ``|g|_1``) in one copy.

        Returns ``(closure's value, f, gtd, gmax, g_l1)`` with ``f`` the loss to
        minimise and a non-finite ``f`` when the loss or the gradient is not."""
        loss = closure()
        home = arenas[0].device
        maximize = self.param_groups[0]["maximize"]
        if isinstance(loss, Tensor):
            values = [loss if loss.dim() == 0 else loss.reshape(())]
        else:
            values = [torch.tensor(float(loss), dtype=torch.float64, device=home)]
        for arena in arenas:
            _gather(arena, maximize)
            values.extend(_gradient_stats(arena, want_gtd, want_l1))
        read = self._to_host(values, home)
        f, rest = (-read[0] if maximize else read[0]), read[1:]
        k = 2 + want_gtd + want_l1
        gtd = gmax = g_l1 = 0.0
        for a, arena in enumerate(arenas):
            row = rest[a * k : (a + 1) * k]
            lo, hi = row[0], row[1]
            gmax = max(gmax, -lo, hi) if math.isfinite(lo) and math.isfinite(hi) else math.inf
            if want_gtd:
                gtd += arena.scale * row[2]
            if want_l1:
                g_l1 += row[-1]
        if not math.isfinite(gmax):
            f = math.nan
        return loss, f, gtd, gmax, g_l1

    # -- the step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float | Tensor]):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable): A closure that reevaluates the model
                and returns the loss.
        """
        closure = torch.enable_grad()(closure)
        cfg = self.param_groups[0]  # the loop settings are the same in every group
        max_iter, max_eval = cfg["max_iter"], cfg["max_eval"]
        exact = cfg.get("max_eval_given", True)
        tolerance_grad, tolerance_change = cfg["tolerance_grad"], cfg["tolerance_change"]
        m = self.defaults["history_size"]
        if self._arenas is None:
            self._arenas = self._build_arenas()
        arenas = self._arenas
        home = arenas[0].device
        lr = float(self.param_groups[0]["lr"])
        for arena in arenas:
            # The first group's lr is torch's lr (it is in t); with lr = 0 no step moves at all.
            arena.scale = float(self.param_groups[arena.group]["lr"]) / lr if lr != 0 else 1.0

        state = self.state[self._first_param()]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)

        orig_loss, f, _, gmax, g_l1 = self._evaluate(closure, arenas, False, state["n_iter"] == 0)
        current_evals = 1
        state["func_evals"] += 1
        if not math.isfinite(f) or gmax <= tolerance_grad:
            return orig_loss

        gradient_at = "g"  # where the gradient at the current point is: g (the last evaluation), prev or kept
        prev_loss = state.get("prev_loss")
        t = state.get("t")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1

            # -- direction ------------------------------------------------------
            for arena in arenas:
                _load_gradient(arena, gradient_at)
            if state["n_iter"] == 1:
                _first_direction(arenas, state, m)
            else:
                _update_model_and_direction(arenas, state, m)
            read = self._to_host([x for arena in arenas for x in _direction_stats(arena)], home)
            gtd = sum(arena.scale * read[3 * a] for a, arena in enumerate(arenas))
            d_max = [max(-read[3 * a + 1], read[3 * a + 2]) for a in range(len(arenas))]
            prev_loss = f

            t = min(1.0, 1.0 / g_l1 if g_l1 > 0 else math.inf) * lr if state["n_iter"] == 1 else lr
            if gtd > -tolerance_change:
                _stage_step(arenas, t, state)
                break

            # -- step length ------------------------------------------------------
            ls_func_evals = 0
            opt_cond = False
            stop = False
            if cfg["line_search_fn"] is not None and exact and current_evals >= max_eval:
                t, stop = 0.0, True  # no evaluation left to try a step with
            elif cfg["line_search_fn"] is not None:
                # torch's line search may take one evaluation past its max_eval (it
                # budgets the trials after the first); a max_eval the user set holds.
                budget = max_eval - current_evals + (0 if exact else 1)
                point, ls_func_evals, gmax = self._line_search(
                    closure, arenas, f, gtd, t, d_max, gmax, budget, tolerance_change
                )
                t, f = point.t, point.f
                gradient_at = "g" if point.index == ls_func_evals else ("prev" if point.index == 0 else "kept")
                opt_cond = gmax <= tolerance_grad
            else:
                for arena in arenas:
                    _move(arena, t * arena.scale, from_saved=False)
                if n_iter != max_iter and current_evals < max_eval:
                    budget = max_eval - current_evals
                    while True:
                        _, f_new, _, gmax, _ = self._evaluate(closure, arenas, False, False)
                        ls_func_evals += 1
                        if math.isfinite(f_new):
                            f = f_new
                            break
                        # A failed trial: halve the step while evaluations remain, else undo it.
                        t_new = t / 2 if ls_func_evals < budget else 0.0
                        for arena in arenas:
                            _move(arena, (t_new - t) * arena.scale, from_saved=False)
                        t = t_new
                        if t == 0.0:
                            stop = True
                            break
                    gradient_at = "g"
                    opt_cond = gmax <= tolerance_grad

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals
            _stage_step(arenas, t, state)

            # -- termination ------------------------------------------------------
            if stop or n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if max(abs(t * arena.scale) * dm for arena, dm in zip(arenas, d_max)) <= tolerance_change:
                break
            if abs(f - prev_loss) < tolerance_change:
                break

        state["t"] = t
        state["prev_loss"] = prev_loss
        return orig_loss

    def _line_search(self, closure, arenas, f, gtd, t, d_max, gmax, budget, tolerance_change):
        """Strong-Wolfe search from the saved current point; leaves the parameters at
        the accepted point. Returns ``(point, evaluations, max |g| there)``."""
        for arena in arenas:
            arena.save_point()
        gmax_at = {0: gmax}
        at = {"t": 0.0, "kept": None}

        def evaluate(step: float) -> tuple[float, float]:
            for arena in arenas:
                _move(arena, step * arena.scale, from_saved=at["t"] != 0.0)
            at["t"] = step
            _, f_new, gtd_new, gmax_new, _ = self._evaluate(closure, arenas, True, False)
            gmax_at[len(gmax_at)] = gmax_new
            return f_new, gtd_new

        def keep(point: Point) -> None:
            for arena in arenas:
                arena.keep_gradient()
            at["kept"] = point.index

        d_norm = max(abs(arena.scale) * dm for arena, dm in zip(arenas, d_max))
        point, evals = _strong_wolfe(
            evaluate, keep, f, gtd, t, d_norm, budget, tolerance_change=tolerance_change
        )
        if point.index not in (0, evals) and at["kept"] != point.index:
            raise AssertionError("line search returned a point whose gradient was not kept")
        if point.t != at["t"]:
            for arena in arenas:
                _move(arena, point.t * arena.scale, from_saved=True)
        return point, evals, gmax_at[point.index]


# -- flat state -----------------------------------------------------------------------
class _Arena:
    """The parameters of one (group, device, dtype) laid end to end, and their slice of
    every vector of the model, all rows of one ``[2m + 5, n]`` buffer:

    - rows 0 and 1 take a rejected pair, rows ``2 .. m + 1`` hold ``s`` and
      ``m + 2 .. 2m + 1`` hold ``y`` in the ring order of :mod:`mlbfgs_fused._math`
      (newest in slot ``(pair_count - 1) % m``): storing a pair is one ``index_copy_``
      into ``ring`` (rows ``0 .. 2m + 1``) whose rows are decided on the device;
    - row ``2m + 2`` is the gradient ``g`` at the current point, so ``basis``
      (``[S; Y; g]``, rows ``2 .. 2m + 2``) is what a direction is a combination of:
      its dots with ``g`` are one matrix-vector product, the direction another;
    - row ``2m + 3`` is the direction ``d`` (scaled in place into the step ``s`` once
      taken), row ``2m + 4`` the previous gradient (turned in place into ``y``), so
      ``pair`` (``[s; y]``) is the pair to store.
    """

    def __init__(self, params: list[Tensor], m: int, group: int, state: dict):
        self.params, self.group, self.m = params, group, m
        self.device, self.dtype = params[0].device, params[0].dtype
        self.scale = 1.0
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        n = self.offsets[-1]
        self.buffer = torch.zeros(2 * m + 5, n, dtype=self.dtype, device=self.device)
        self.ring = self.buffer[: 2 * m + 2]
        self.history = self.buffer[2 : 2 * m + 2]
        self.basis = self.buffer[2 : 2 * m + 3]
        self.pair = self.buffer[2 * m + 3 :]
        self.g, self.d, self.prev = self.buffer[2 * m + 2 :].unbind(0)
        self.g_views, self.d_views = self.views(self.g), self.views(self.d)
        self.saved: Tensor | None = None  # the line search's one saved point
        self.kept: Tensor | None = None  # and the gradient of the point it keeps
        self._adopt(state)

    def views(self, flat: Tensor) -> list[Tensor]:
        return [flat[a:b].view(p.shape) for p, a, b in zip(self.params, self.offsets, self.offsets[1:])]

    def _adopt(self, state: dict) -> None:
        """Copy loaded state in, then point ``state`` at the arena's buffers."""
        m = self.m
        first = state[self.params[0]]
        for key, rows in (("history_s", self.ring[2 : m + 2]), ("history_y", self.ring[m + 2 :])):
            if key in first:
                _copy_checked(rows, first[key], key)
            first[key] = rows
        for key, flat in (("direction", self.d), ("prev_grad", self.prev)):
            for p, view in zip(self.params, self.views(flat)):
                if key in state[p]:
                    _copy_checked(view, state[p][key], key)
                state[p][key] = view

    def save_point(self) -> None:
        if self.saved is None:
            self.saved = torch.empty_like(self.g)
            self.saved_views = self.views(self.saved)
        torch._foreach_copy_(self.saved_views, self.params)

    def keep_gradient(self) -> None:
        if self.kept is None:
            self.kept = torch.empty_like(self.g)
        self.kept.copy_(self.g)


def _copy_checked(dst: Tensor, src: Tensor, key: str) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"loaded state '{key}' has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


# -- the per-iteration passes ------------------------------------------------------------
# Everything an iteration does to vectors goes through the functions below (gather,
# dots against the ring, the direction from coefficients, the in-place move of the
# parameters, the per-evaluation statistics), so a fused backend can replace them
# one by one; the rest of the step is host logic on a few scalars and tiny float64
# tensors on the first parameter's device.


def _gather(arena: _Arena, maximize: bool) -> None:
    """``g <- grad`` over the arena (zero where a parameter has no gradient), negated under ``maximize``."""
    present = [(view, p.grad) for view, p in zip(arena.g_views, arena.params) if p.grad is not None]
    if len(present) < len(arena.params):
        arena.g.zero_()
    if present:
        torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
    if maximize:
        arena.g.neg_()


def _load_gradient(arena: _Arena, where: str) -> None:
    """Put the gradient at the current point into ``arena.g``: the last evaluation left
    it there, unless the line search returned its start (``prev``) or a kept point."""
    if where == "prev":
        arena.g.copy_(arena.prev)
    elif where == "kept":
        arena.g.copy_(arena.kept)


def _gradient_stats(arena: _Arena, want_gtd: bool, want_l1: bool) -> list[Tensor]:
    """``min g`` and ``max g`` (the host takes ``max |g|``), then ``g . d`` and ``|g|_1`` when asked."""
    out = list(torch.aminmax(arena.g))  # one pass; vector_norm(inf) is several times slower on CPU
    if want_gtd:
        out.append(torch.dot(arena.g, arena.d))
    if want_l1:
        out.append(arena.g.abs().sum())  # torch's own formula: the first step is torch's to the bit
    return out


def _direction_stats(arena: _Arena) -> list[Tensor]:
    """``g . d``, ``min d`` and ``max d`` of the new direction."""
    return [torch.dot(arena.g, arena.d), *torch.aminmax(arena.d)]


def _stage_step(arenas: list[_Arena], t: float, state: dict) -> None:
    """``d <- alpha d``: the direction becomes the step ``s`` of the next pair (torch's
    ``d.mul(t)``). ``state["staged_alpha"]``: the common ``alpha`` (None when groups differ)."""
    alphas = {t * arena.scale for arena in arenas}
    for arena in arenas:
        arena.d.mul_(t * arena.scale)
    state["staged_alpha"] = alphas.pop() if len(alphas) == 1 else None


def _move(arena: _Arena, alpha: float, from_saved: bool) -> None:
    """Parameters ``<- saved + alpha d`` (or ``+= alpha d``), in place."""
    if from_saved:
        torch._foreach_copy_(arena.params, arena.saved_views)
    torch._foreach_add_(arena.params, arena.d_views, alpha=alpha)


def _to_home(x: Tensor, home: torch.device) -> Tensor:
    return x if x.device == home and x.dtype == torch.float64 else x.to(home, torch.float64)


def _update_model_and_direction(arenas: list[_Arena], state: dict, m: int) -> None:
    """Store the pair of the last step (when ``s.y > 1e-10``) and write ``d = -H g``.

    ``gram`` is ``[S; Y] [S; Y; g]^T`` (``[2m, 2m + 1]``, ``g`` the gradient the last
    direction was formed at; an empty slot has ``s.y = y.y = 1`` and no other entry,
    which makes its coefficients exactly 0 without masks). A new pair needs its dots
    with the ring, the two-loop the ring's dots with the new ``g``. Only ``[S; Y] g``
    takes a pass over the ring (one matrix-vector product, after the pair is stored);
    the rest follows on scalars (Chen, Wang, Zhou): ``[S; Y] y = [S; Y] g - [S; Y] g_prev``
    (the old last column) and ``[S; Y] s = alpha [S; Y] d_prev = alpha gram c_prev``,
    with ``c_prev`` the previous direction's coefficients over ``[S; Y; g_prev]``. (When
    groups took steps of different lengths, ``s`` is no multiple of ``d_prev`` and
    ``[S; Y] s`` takes one more pass.) The two-loop coefficients follow on scalars; a
    second pass forms ``d``. The pair decision stays on the device.
    """
    gram, pair_count, coef = state["gram"], state["pair_count"], state["direction_coefficients"]
    home = gram.device
    consts = _constants(m, home)
    alpha = state.get("staged_alpha")
    pair_gram = None  # [[s.s, s.y], [y.s, y.y]]
    ring_s = None  # [S; Y] s, before the pair is stored
    for arena in arenas:
        torch.sub(arena.g, arena.prev, out=arena.prev)  # y = g - g_prev
        pair_gram = _sum(pair_gram, _to_home(torch.mm(arena.pair, arena.pair.T), home))
        if alpha is None:
            ring_s = _sum(ring_s, _to_home(torch.mv(arena.history, arena.d), home))
    if alpha is not None:
        ring_s = torch.mv(gram, coef).mul_(alpha)
    # y.s (the entry gram keeps as s.y), NaN when any entry is not finite (0 * inf): the pair rule.
    accept = torch.dot(pair_gram.view(-1), consts["pick_sy"]) > _CURVATURE_MIN
    slot_rows = torch.remainder(pair_count, m) + consts["pair_rows"]  # [slot, m + slot] of gram
    ring_rows = torch.where(accept, slot_rows + 2, consts["discard_rows"])
    ring_g = None
    for arena in arenas:
        arena.ring.index_copy_(0, ring_rows if arena.device == home else ring_rows.to(arena.device), arena.pair)
        arena.prev.copy_(arena.g)
        ring_g = _sum(ring_g, _to_home(torch.mv(arena.history, arena.g), home))
    # The slot's new columns [S; Y] s and [S; Y] y, with the pair's own dots in its rows;
    # a rejected pair leaves them as they were.
    g_column = gram.select(1, 2 * m)
    new = torch.stack([ring_s, ring_g - g_column], 1).index_copy_(0, slot_rows, pair_gram)
    new = torch.where(accept, new, gram.index_select(1, slot_rows))
    gram.index_copy_(1, slot_rows, new)
    gram.narrow(1, 0, 2 * m).index_copy_(0, slot_rows, new.T)
    g_column.copy_(ring_g)
    pair_count += accept
    _two_loop(gram, pair_count, consts, out=coef)
    _set_direction(arenas, coef)


def _sum(total: Tensor | None, x: Tensor) -> Tensor:
    return x if total is None else total + x


def _first_direction(arenas: list[_Arena], state: dict, m: int) -> None:
    """``d = -g`` (torch's ``flat_grad.neg()``); the ring is empty, its dots with ``g`` are 0."""
    for arena in arenas:
        torch.neg(arena.g, out=arena.d)
        arena.prev.copy_(arena.g)
    coef = torch.zeros(2 * m + 1, dtype=torch.float64, device=state["gram"].device)
    coef[-1] = -1.0
    state["direction_coefficients"] = coef


def _set_direction(arenas: list[_Arena], coef: Tensor) -> None:
    """``d = [S; Y; g]^T coef``: one pass over each ring."""
    for arena in arenas:
        torch.mv(arena.basis.T, coef.to(arena.device, arena.dtype), out=arena.d)


def _upgrade_gram(blocks: Tensor, ring_grad_dots: Tensor, pair_count: Tensor) -> Tensor:
    """The model of a version 0.1 checkpoint in today's layout: it kept ``[S S^T, S Y^T,
    Y Y^T]`` as ``[3, m, m]`` and ``[S; Y] g`` apart; ``gram`` is ``[S; Y] [S; Y; g]^T``
    with the pattern of :func:`_empty_gram` in the slots not yet filled."""
    m = blocks.shape[-1]
    ss, sy, yy = blocks.to(torch.float64).unbind(0)
    gram = torch.cat([torch.cat([ss, sy, ring_grad_dots[:m, None]], 1),
                      torch.cat([sy.T, yy, ring_grad_dots[m:, None]], 1)], 0).to(torch.float64)
    empty = _empty_gram(m, gram.device)
    held = torch.arange(m, device=gram.device) < pair_count.to(gram.device)
    held_rows = torch.cat([held, held])
    both = held_rows[:, None] & torch.cat([held_rows, held_rows.new_ones(1)])[None, :]
    return torch.where(both, gram, empty)


def _empty_gram(m: int, device: torch.device) -> Tensor:
    """``[S; Y] [S; Y; g]^T`` with every slot empty (``s.y = y.y = 1`` there)."""
    gram = torch.zeros(2 * m, 2 * m + 1, dtype=torch.float64, device=device)
    k = torch.arange(m, device=device)
    gram[k, m + k] = gram[m + k, k] = gram[m + k, m + k] = 1.0
    return gram


@functools.lru_cache(maxsize=8)
def _constants(m: int, device: torch.device) -> dict[str, Tensor]:
    """Index tensors of the model's small algebra, made once per (m, device)."""
    k = torch.arange(m, device=device)
    # Row q: gram's rows in recency order (s_k, then y_k, newest first, then g) when
    # pair_count % m == q: the k-th newest pair sits in slot (q - 1 - k) % m.
    slots = torch.remainder(torch.arange(m, device=device).unsqueeze(1) - 1 - k, m)
    g_row = torch.full((m, 1), 2 * m, device=device)
    return {
        "pair_rows": torch.tensor([0, m], device=device),  # + slot: the rows of s and y in gram
        "discard_rows": torch.tensor([0, 1], device=device),
        "pick_sy": torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64, device=device),
        "recency": torch.cat([slots, slots + m, g_row], 1),
    }


def _two_loop(gram: Tensor, pair_count: Tensor, consts: dict, out: Tensor) -> None:
    """``out <- -(coefficients of H g)`` over ``[S; Y; g]``, as
    :func:`mlbfgs_fused._math.two_loop_coefficients` computes them, in a fixed number
    of operations whatever ``m``.

    Each loop of the two-loop recursion is a triangular solve on the Gram matrix
    (newest pair first, index ``k``): the first loop's ``alpha_k = (s_k.g -
    sum_{j<k} (s_k.y_j) alpha_j) / (s_k.y_k)`` is forward substitution with
    ``tril(S Y^T)``; with ``H0 = gamma I`` and ``u = alpha - beta``, the second
    loop's ``(s_k.y_k) u_k + sum_{j>k} (s_j.y_k) u_j = (s_k.y_k) alpha_k -
    gamma (y_k.g - sum_j (y_k.y_j) alpha_j)`` is back substitution with
    ``triu(Y S^T)``. Then ``H g = gamma g - gamma sum_k alpha_k y_k + sum_k u_k s_k``.
    Substitution performs the recursion's own arithmetic, so this is the
    recursion; it replaces ``4 m`` tiny operations by two LAPACK calls. An empty
    slot (``s.y = y.y = 1``, zero dots otherwise) gets ``alpha = u = 0``; with no
    pair at all, ``gamma = 1``.
    """
    m = gram.shape[0] // 2
    order = consts["recency"].index_select(0, torch.remainder(pair_count, m).view(1)).view(-1)
    # Only the columns of y and g are read: gathering them first halves the (slow) column gather.
    s_rows, y_rows = gram.index_select(1, order.narrow(0, m, m + 1)).index_select(0, order.narrow(0, 0, 2 * m)).split(m)
    SY, Sg = s_rows.split(m, 1)
    YY, Yg = y_rows.split(m, 1)
    diag = SY.diagonal().unsqueeze(1)
    gamma = diag.narrow(0, 0, 1) / YY.narrow(0, 0, 1).narrow(1, 0, 1)  # s.y / y.y of the newest pair
    alpha = torch.linalg.solve_triangular(SY, Sg, upper=False)  # reads the lower triangle only
    neg_rhs = (Yg - YY @ alpha).mul_(gamma).sub_(diag * alpha)  # -rhs of the second loop: the solve gives -u
    neg_u = torch.linalg.solve_triangular(SY.T, neg_rhs, upper=True)
    out.index_copy_(0, order, torch.cat([neg_u, alpha.mul_(gamma), gamma.neg()]).view(-1))
