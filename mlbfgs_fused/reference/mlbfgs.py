"""The mL-BFGS step written for clarity: the ground truth every backend is tested against.

Out of place, float64 by default, flat vectors, Python lists and the classic
two-loop recursion -- DESIGN.md section 2 line by line. Used by the tests and
the benchmarks only; it is slow on purpose.

One :class:`ReferenceGroup` holds one parameter group: a flat parameter vector
(the group's parameters end to end) split into blocks ``[bounds[b], bounds[b+1])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DEFAULTS = dict(
    lr=0.1,
    momentum=0.9,
    weight_decay=0.0,
    history_size=10,
    update_period=50,
    ema_decay=(0.999, 0.999),
    pair_momentum=0.9,
    damping=0.01,
    sigma_low=0.01,
    sigma_high=1.5,
    eps=1e-12,
    normalize=True,
    maximize=False,
)


@dataclass
class ReferenceBlock:
    pairs: list = field(default_factory=list)  # [(s, yhat)], oldest first
    param_snapshot: torch.Tensor | None = None
    grad_snapshot: torch.Tensor | None = None
    skipped_pairs: int = 0
    damped_pairs: int = 0  # pairs whose s.y / s.s fell outside [sigma_low, sigma_high]


class ReferenceGroup:
    def __init__(self, theta: torch.Tensor, bounds, dtype=torch.float64, **hyper):
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}")
        self.h = {**DEFAULTS, **hyper}
        self.theta = theta.detach().to(dtype).clone()
        self.bounds = list(bounds)
        self.blocks = [ReferenceBlock() for _ in range(len(self.bounds) - 1)]
        self.buf = None
        self.param_ema = None
        self.grad_ema = None
        self.t = 0  # steps taken
        self.skipped_steps = 0

    def _slices(self):
        return [slice(self.bounds[b], self.bounds[b + 1]) for b in range(len(self.blocks))]

    @staticmethod
    def two_loop(g: torch.Tensor, pairs) -> torch.Tensor:
        """d = H g over ``pairs`` (oldest first), H0 = gamma I from the newest pair."""
        if not pairs:
            return g.clone()
        q = g.clone()
        alphas = []
        for s, y in reversed(pairs):
            alpha = s.dot(q) / s.dot(y)
            q = q - alpha * y
            alphas.append(alpha)
        s_new, y_new = pairs[-1]
        r = (s_new.dot(y_new) / y_new.dot(y_new)) * q
        for (s, y), alpha in zip(pairs, reversed(alphas)):
            beta = y.dot(r) / s.dot(y)
            r = r + (alpha - beta) * s
        return r

    def step(self, grad: torch.Tensor, has_grad: torch.Tensor | None = None) -> None:
        """One step. ``has_grad`` is a bool mask of entries whose parameter has a gradient."""
        h = self.h
        grad = grad.to(self.theta.dtype)
        if has_grad is None:
            has_grad = torch.ones_like(self.theta, dtype=torch.bool)
        if not has_grad.any():
            return  # a group with no gradient at all is not stepped
        zero = torch.zeros_like(self.theta)

        # 1. the effective gradient; entries without a gradient count as zero
        g = grad + h["weight_decay"] * self.theta
        if h["maximize"]:
            g = -g
        g = torch.where(has_grad, g, zero)

        # 2. a non-finite gradient changes nothing but the counter
        if not torch.isfinite(g).all():
            self.skipped_steps += 1
            return
        t = self.t + 1

        # 3. direction per block
        d = torch.cat([self.two_loop(g[sl], blk.pairs) for sl, blk in zip(self._slices(), self.blocks)])

        # 4. normalise over the whole group once any block holds a pair
        if h["normalize"] and any(blk.pairs for blk in self.blocks):
            norm = d.norm()
            if norm > 0:
                d = d / norm

        # 5. heavy ball, only where a gradient exists
        buf = d if self.buf is None else h["momentum"] * self.buf + d
        self.buf = torch.where(has_grad, buf, zero if self.buf is None else self.buf)
        new_theta = torch.where(has_grad, self.theta - h["lr"] * self.buf, self.theta)

        # 6. EMAs with the parameters before the update
        beta_p, beta_g = h["ema_decay"]
        if self.param_ema is None:
            self.param_ema = self.theta.clone()
            self.grad_ema = torch.where(has_grad, g, zero)
        else:
            p_new = beta_p * self.param_ema + (1 - beta_p) * self.theta
            g_new = beta_g * self.grad_ema + (1 - beta_g) * g
            self.param_ema = torch.where(has_grad, p_new, self.param_ema)
            self.grad_ema = torch.where(has_grad, g_new, self.grad_ema)
        self.theta = new_theta

        # 7. curvature pairs every update_period steps
        if t % h["update_period"] == 0:
            for sl, blk in zip(self._slices(), self.blocks):
                self._push_pair(blk, self.param_ema[sl], self.grad_ema[sl])

        # 8.
        self.t = t

    def _push_pair(self, blk: ReferenceBlock, P: torch.Tensor, G: torch.Tensor) -> None:
        h = self.h
        if blk.param_snapshot is not None:
            s = P - blk.param_snapshot
            y = G - blk.grad_snapshot
            r = h["pair_momentum"]
            if blk.pairs and r > 0:
                s_last, y_last = blk.pairs[-1]
                s = (1 - r) * s + r * s_last
                y = (1 - r) * y + r * y_last
            mu = s.dot(y) / (s.dot(s) + h["eps"])
            if mu < h["sigma_low"]:
                phi = (1 - h["sigma_low"]) / (1 - mu)
            elif mu > h["sigma_high"]:
                phi = (h["sigma_high"] - 1) / (mu - 1)
            else:
                phi = torch.ones_like(mu)
            if not h["sigma_low"] <= mu <= h["sigma_high"]:
                blk.damped_pairs += 1
            phi = torch.clamp(phi, max=1 - h["damping"])
            yhat = phi * y + (1 - phi) * s
            curvature = s.dot(yhat)
            if torch.isfinite(curvature) and curvature > h["eps"]:
                blk.pairs.append((s, yhat))
                if len(blk.pairs) > h["history_size"]:
                    blk.pairs.pop(0)
            else:
                blk.skipped_pairs += 1
        blk.param_snapshot = P.clone()
        blk.grad_snapshot = G.clone()
