"""Float64 ground truth of :class:`mlbfgs_fused.LBFGS`: the textbook two-loop on explicit vectors.

``torch.optim.LBFGS``'s algorithm (the loop, its termination rules, the pair rule
``s.y > 1e-10``, ``H0 = s.y / y.y``, the first step ``min(1, 1/|g|_1) * lr``) with
the extensions of ``LBFGS``:

- several groups: ``scale`` holds, per element, the element's group ``lr`` over the
  first group's; the step is ``x + t * scale * d`` (one group: ``scale = 1``);
- ``maximize``: minimise ``-f``;
- ``max_eval`` set by the user counts every evaluation, the line search's included;
  left to its default (``max_iter * 5 // 4``) it means what it means in torch: the
  line search may take one evaluation more (torch budgets its trials after the first);
- a non-finite loss or gradient at a trial point fails the trial (the line search
  backs off; without one the step is halved, then undone when no evaluation is
  left) and never reaches the history; a step starting at a non-finite point
  changes nothing.

Readable first: vectors are whole ``[N]`` float64 tensors, every dot is explicit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._line_search import _strong_wolfe


@dataclass
class ReferenceLBFGS:
    """One optimizer over a flat float64 vector ``x``; ``fg(x) -> (f, g)`` is the closure."""

    lr: float = 1.0
    max_iter: int = 20
    max_eval: int | None = None
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9
    history_size: int = 100
    line_search_fn: str | None = None
    maximize: bool = False
    scale: Tensor | None = None
    # state
    func_evals: int = 0
    n_iter: int = 0
    s_list: list = field(default_factory=list)
    y_list: list = field(default_factory=list)
    d: Tensor | None = None  # after a step: the step s itself (t * scale * d)
    prev_grad: Tensor | None = None
    prev_loss: float | None = None
    t: float | None = None

    def __post_init__(self):
        self.exact = self.max_eval is not None  # a max_eval the user set holds exactly
        if self.max_eval is None:
            self.max_eval = self.max_iter * 5 // 4

    def _fg(self, fg, x):
        f, g = fg(x)
        f, g = float(f), g.to(torch.float64)
        if self.maximize:
            f, g = -f, -g
        if not (math.isfinite(f) and bool(torch.isfinite(g).all())):
            f = math.nan
        return f, g

    def direction(self, g: Tensor) -> Tensor:
        q = -g
        alphas = []
        for s, y in zip(reversed(self.s_list), reversed(self.y_list)):
            a = s.dot(q) / s.dot(y)
            alphas.append(a)
            q = q - a * y
        if self.s_list:
            s, y = self.s_list[-1], self.y_list[-1]
            q = q * (s.dot(y) / y.dot(y))
        for (s, y), a in zip(zip(self.s_list, self.y_list), reversed(alphas)):
            b = y.dot(q) / s.dot(y)
            q = q + (a - b) * s
        return q

    def step(self, x: Tensor, fg: Callable[[Tensor], tuple[float, Tensor]]) -> Tensor:
        """One ``optimizer.step(closure)``; returns the new ``x``."""
        scale = torch.ones_like(x) if self.scale is None else self.scale
        f, g = self._fg(fg, x)
        evals = 1
        self.func_evals += 1
        if not math.isfinite(f) or float(g.abs().max()) <= self.tolerance_grad:
            return x
        n, t = 0, self.t  # max_iter = 0: one evaluation, no iteration (t kept, as torch keeps it)
        while n < self.max_iter:
            n += 1
            self.n_iter += 1
            if self.n_iter == 1:
                self.s_list, self.y_list = [], []
            else:
                s, y = self.d, g - self.prev_grad
                ys = float(s.dot(y))
                if math.isfinite(ys) and ys > 1e-10 and math.isfinite(float(y.dot(y))):
                    self.s_list.append(s)
                    self.y_list.append(y)
                    del self.s_list[: -self.history_size], self.y_list[: -self.history_size]
            d = self.direction(g)
            self.prev_grad = g
            prev_loss = f
            g_l1 = float(g.abs().sum())
            t = min(1.0, 1.0 / g_l1 if g_l1 > 0 else math.inf) * self.lr if self.n_iter == 1 else self.lr
            step_dir = scale * d  # the direction of the step, scaled per group
            gtd = float(g.dot(step_dir))
            if gtd > -self.tolerance_change:
                self.d = t * step_dir
                break
            stop, opt_cond, used = False, False, 0
            if self.line_search_fn is not None:
                if self.exact and evals >= self.max_eval:
                    t, stop = 0.0, True
                else:
                    grads = {0: g}
                    last = {}

                    def evaluate(step: float):
                        f_new, g_new = self._fg(fg, x + step * step_dir)
                        last["g"] = g_new
                        grads[len(grads)] = g_new
                        return f_new, float(g_new.dot(step_dir))

                    point, used = _strong_wolfe(
                        evaluate, lambda p: None, f, gtd, t, float(step_dir.abs().max()),
                        self.max_eval - evals + (0 if self.exact else 1), tolerance_change=self.tolerance_change,
                    )
                    t, f, g = point.t, point.f, grads[point.index]
                    x = x + t * step_dir
                    opt_cond = float(g.abs().max()) <= self.tolerance_grad
            else:
                x_new = x + t * step_dir
                if n != self.max_iter and evals < self.max_eval:
                    budget = self.max_eval - evals
                    while True:
                        f_new, g_new = self._fg(fg, x_new)
                        used += 1
                        if math.isfinite(f_new):
                            f, g = f_new, g_new
                            break
                        t = t / 2 if used < budget else 0.0
                        x_new = x + t * step_dir
                        if t == 0.0:
                            stop = True
                            break
                    opt_cond = float(g.abs().max()) <= self.tolerance_grad
                x = x_new
            evals += used
            self.func_evals += used
            self.d = t * step_dir
            if stop or n == self.max_iter or evals >= self.max_eval or opt_cond:
                break
            if float(self.d.abs().max()) <= self.tolerance_change:
                break
            if abs(f - prev_loss) < self.tolerance_change:
                break
        self.t = t
        return x
