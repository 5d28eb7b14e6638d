"""A re-implementation of the authors' released mL-BFGS step (Niu et al., TMLR 2023).

Written from a reading of their released optimizer (``BlockSlimQN``), not copied
from it. Its implementation style is theirs: every step, per block, the
parameters and (cloned) gradients are flattened with ``torch.cat``; the
curvature pairs live in Python lists; the two-loop recursion and the damping
read scalars back to the host (a device-to-host sync per iteration); the
direction is copied back into ``.grad`` and a ``torch.optim.SGD`` with momentum
takes the step.

Its math is that of ``MLBFGS(variant="released")`` (docs/design.md, "The released
variant"), which differs from the paper's in three ways:

- E1: the averages carry no ``(1 - beta)`` factor: ``P = beta_p P + theta``,
  ``G = beta_g G + g`` (``P = theta``, ``G = g`` at the first step);
- E2: at every step with ``t % T == 0``, after the pair is formed and the
  snapshots taken, the gradient average restarts from the current ``g``;
- E4: a pair formed at step ``t`` is already used for the direction at step ``t``.

Their code's weight-decay slip in the gradient average (``wd * grad`` for
``wd * theta``) is not reproduced, and a pair with ``s.yhat <= eps`` is skipped,
as in ``MLBFGS``. ``tests/test_bench_baselines.py`` checks the trajectory against
a float64 expectation, so timing and memory differences with ``MLBFGS`` come from
the implementation alone.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _Block:
    def __init__(self, params: list[Tensor]):
        self.params = params
        self.s_hist: list[Tensor] = []
        self.y_hist: list[Tensor] = []
        self.rho: list[float] = []  # 1 / s.yhat per pair, host floats
        self.gamma = 1.0  # s.yhat / yhat.yhat of the newest pair
        self.param_ema: Tensor | None = None
        self.grad_ema: Tensor | None = None
        self.param_snapshot: Tensor | None = None
        self.grad_snapshot: Tensor | None = None


class AuthorsStyleMLBFGS:
    def __init__(
        self,
        params,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        history_size: int = 10,
        update_period: int = 50,
        ema_decay: tuple[float, float] = (0.999, 0.999),
        pair_momentum: float = 0.9,
        damping: float = 0.01,
        sigma_low: float = 0.01,
        sigma_high: float = 1.5,
        eps: float = 1e-12,
        blocks: list[list[Tensor]] | None = None,
    ):
        params = list(params)
        self.blocks = [_Block(list(b)) for b in (blocks or [params])]
        self.sgd = torch.optim.SGD(params, lr=lr, momentum=momentum)
        self.weight_decay = weight_decay
        self.history_size = history_size
        self.update_period = update_period
        self.ema_decay = ema_decay
        self.pair_momentum = pair_momentum
        self.damping = damping
        self.sigma_low, self.sigma_high = sigma_low, sigma_high
        self.eps = eps
        self.t = 0

    # The SGD inside holds lr and momentum: LR schedulers drive it through these.
    @property
    def param_groups(self):
        return self.sgd.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        due = self.t % self.update_period == 0
        beta_p, beta_g = self.ema_decay
        directions = []
        for blk in self.blocks:
            theta = torch.cat([p.data.view(-1) for p in blk.params])
            g = torch.cat([p.grad.clone().view(-1) for p in blk.params])
            if self.weight_decay != 0:
                g.add_(theta, alpha=self.weight_decay)
            # E1: sums, not averages; with the parameters before this step's update.
            if blk.param_ema is None:
                blk.param_ema, blk.grad_ema = theta.clone(), g.clone()
            else:
                blk.param_ema.mul_(beta_p).add_(theta)
                blk.grad_ema.mul_(beta_g).add_(g)
            if due:
                self._update_pairs(blk)
                blk.grad_ema.copy_(g)  # E2
            directions.append(self._two_loop(blk, g))  # E4: after this step's pair
        if any(blk.s_hist for blk in self.blocks):
            norm = math.sqrt(sum(d.dot(d).item() for d in directions))
            if norm > 0:
                for d in directions:
                    d.div_(norm)
        for blk, d in zip(self.blocks, directions):
            offset = 0
            for p in blk.params:
                n = p.numel()
                p.grad.copy_(d[offset : offset + n].view_as(p))
                offset += n
        self.sgd.step()

    def _two_loop(self, blk: _Block, g: Tensor) -> Tensor:
        if not blk.s_hist:
            return g
        q = g.clone()
        alphas = []
        for s, y, rho in zip(reversed(blk.s_hist), reversed(blk.y_hist), reversed(blk.rho)):
            alpha = (s.dot(q) * rho).item()
            q.add_(y, alpha=-alpha)
            alphas.append(alpha)
        r = q.mul_(blk.gamma)
        for s, y, rho, alpha in zip(blk.s_hist, blk.y_hist, blk.rho, reversed(alphas)):
            beta = (y.dot(r) * rho).item()
            r.add_(s, alpha=alpha - beta)
        return r

    def _update_pairs(self, blk: _Block) -> None:
        if blk.param_snapshot is not None:
            s = blk.param_ema - blk.param_snapshot
            y = blk.grad_ema - blk.grad_snapshot
            r = self.pair_momentum
            if blk.s_hist and r > 0:
                s = (1 - r) * s + r * blk.s_hist[-1]
                y = (1 - r) * y + r * blk.y_hist[-1]
            s_dot_y, s_dot_s = s.dot(y).item(), s.dot(s).item()
            mu = s_dot_y / (s_dot_s + self.eps)
            if mu < self.sigma_low:
                phi = (1 - self.sigma_low) / (1 - mu)
            elif mu > self.sigma_high:
                phi = (self.sigma_high - 1) / (mu - 1)
            else:
                phi = 1.0
            phi = min(phi, 1 - self.damping)
            yhat = phi * y + (1 - phi) * s
            curvature = s.dot(yhat).item()
            if math.isfinite(curvature) and curvature > self.eps:
                self._push(blk, s, yhat, curvature, yhat.dot(yhat).item())
        blk.param_snapshot = blk.param_ema.clone()
        blk.grad_snapshot = blk.grad_ema.clone()

    def _push(self, blk: _Block, s: Tensor, yhat: Tensor, s_dot_y: float, y_dot_y: float) -> None:
        blk.s_hist.append(s)
        blk.y_hist.append(yhat)
        blk.rho.append(1.0 / s_dot_y)
        blk.gamma = s_dot_y / y_dot_y
        if len(blk.s_hist) > self.history_size:
            blk.s_hist.pop(0)
            blk.y_hist.pop(0)
            blk.rho.pop(0)

    # -- benchmarks only ----------------------------------------------------------
    def load_steady_state(self, s_rows: list[Tensor], y_rows: list[Tensor], step: int) -> None:
        """Start from a full history (oldest first) and random EMAs and snapshots,
        as after ``step`` steps of training, so a timed step is a steady-state one."""
        (blk,) = self.blocks
        for s, y in zip(s_rows, y_rows):
            self._push(blk, s, y, s.dot(y).item(), y.dot(y).item())
        n = sum(p.numel() for p in blk.params)
        like = blk.params[0]
        blk.param_ema, blk.grad_ema, blk.param_snapshot, blk.grad_snapshot = (
            torch.randn(n, dtype=like.dtype, device=like.device) for _ in range(4)
        )
        for p in blk.params:
            self.sgd.state[p]["momentum_buffer"] = torch.randn_like(p)
        self.t = step

    def state_tensors(self) -> list[Tensor]:
        tensors = [buf for st in self.sgd.state.values() for buf in st.values() if isinstance(buf, Tensor)]
        for blk in self.blocks:
            tensors += blk.s_hist + blk.y_hist
            tensors += [
                t
                for t in (blk.param_ema, blk.grad_ema, blk.param_snapshot, blk.grad_snapshot)
                if t is not None
            ]
        return tensors
