"""The per-iteration work of ``torch.optim.LBFGS`` with a fixed step, as a step() of its own.

Copied line for line from ``torch/optim/lbfgs.py`` (torch 2.x), the loop body of
``LBFGS.step`` without the closure, the line search and the stopping tests:
flat gather of the gradients with ``torch.cat``, the memory update with its
``ys > 1e-10`` test, the two-loop recursion over Python lists (whose
``alpha=-al[i]`` reads a 0-dim tensor back to the host every iteration), the
directional-derivative test and the parameter update ``_add_grad``. Calling
``step()`` once per mini-batch gives the trajectory of ``torch.optim.LBFGS(max_iter=1)``
(checked in ``tests/test_bench_baselines.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class TorchLBFGSDirection:
    def __init__(self, params, lr: float = 1.0, history_size: int = 100, tolerance_change: float = 1e-9):
        self._params = list(params)
        self.lr = lr
        self.history_size = history_size
        self.tolerance_change = tolerance_change
        self.n_iter = 0
        self.d: Tensor | None = None
        self.t = None
        self.old_dirs: list[Tensor] = []
        self.old_stps: list[Tensor] = []
        self.ro: list[Tensor] = []
        self.H_diag = 1
        self.prev_flat_grad: Tensor | None = None
        self.al: list = [None] * history_size

    def _gather_flat_grad(self) -> Tensor:
        views = []
        for p in self._params:
            if p.grad is None:
                view = p.new(p.numel()).zero_()
            else:
                view = p.grad.view(-1)
            views.append(view)
        return torch.cat(views, 0)

    def _add_grad(self, step_size, update: Tensor) -> None:
        offset = 0
        for p in self._params:
            numel = p.numel()
            p.add_(update[offset : offset + numel].view_as(p), alpha=step_size)
            offset += numel

    @torch.no_grad()
    def step(self) -> None:
        flat_grad = self._gather_flat_grad()
        self.n_iter += 1
        if self.n_iter == 1:
            d = flat_grad.neg()
            self.old_dirs, self.old_stps, self.ro = [], [], []
            self.H_diag = 1
        else:
            old_dirs, old_stps, ro = self.old_dirs, self.old_stps, self.ro
            y = flat_grad.sub(self.prev_flat_grad)
            s = self.d.mul(self.t)
            ys = y.dot(s)
            if ys > 1e-10:
                if len(old_dirs) == self.history_size:
                    old_dirs.pop(0)
                    old_stps.pop(0)
                    ro.pop(0)
                old_dirs.append(y)
                old_stps.append(s)
                ro.append(1.0 / ys)
                self.H_diag = ys / y.dot(y)
            num_old = len(old_dirs)
            al = self.al
            q = flat_grad.neg()
            for i in range(num_old - 1, -1, -1):
                al[i] = old_stps[i].dot(q) * ro[i]
                q.add_(old_dirs[i], alpha=-al[i])
            d = r = torch.mul(q, self.H_diag)
            for i in range(num_old):
                be_i = old_dirs[i].dot(r) * ro[i]
                r.add_(old_stps[i], alpha=al[i] - be_i)
        if self.prev_flat_grad is None:
            self.prev_flat_grad = flat_grad.clone(memory_format=torch.contiguous_format)
        else:
            self.prev_flat_grad.copy_(flat_grad)
        if self.n_iter == 1:
            self.t = min(1.0, 1.0 / flat_grad.abs().sum()) * self.lr
        else:
            self.t = self.lr
        self.d = d
        gtd = flat_grad.dot(d)
        if gtd > -self.tolerance_change:
            return
        self._add_grad(self.t, d)

    # -- benchmarks only ----------------------------------------------------------
    def load_steady_state(self, s_rows: list[Tensor], y_rows: list[Tensor]) -> None:
        """Start from a full history (oldest first), a previous gradient and
        direction, as after many iterations, so a timed step is a steady-state one."""
        n = sum(p.numel() for p in self._params)
        like = self._params[0]
        self.old_stps, self.old_dirs = list(s_rows), list(y_rows)
        self.ro = [1.0 / y.dot(s) for s, y in zip(s_rows, y_rows)]
        self.H_diag = y_rows[-1].dot(s_rows[-1]) / y_rows[-1].dot(y_rows[-1])
        # The previous gradient equal to the current one: the timed steps form no new
        # pair (y = 0), so they all run the two-loop over the loaded history.
        if all(p.grad is not None for p in self._params):
            self.prev_flat_grad = self._gather_flat_grad()
        else:
            self.prev_flat_grad = torch.randn(n, dtype=like.dtype, device=like.device)
        self.d = torch.randn(n, dtype=like.dtype, device=like.device)
        self.t = self.lr
        self.n_iter = len(s_rows) + 1

    def state_tensors(self) -> list[Tensor]:
        tensors = self.old_dirs + self.old_stps + self.ro
        return tensors + [t for t in (self.d, self.prev_flat_grad) if isinstance(t, Tensor)]
