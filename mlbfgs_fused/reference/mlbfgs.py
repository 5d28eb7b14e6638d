"""The mL-BFGS step written for clarity: the ground truth every backend is tested against.

Out of place, float64 by default, flat vectors, Python lists and the classic
two-loop recursion, the math of docs/design.md ("The step") line by line. Used
by the tests and the benchmarks only; it is slow on purpose.

One :class:`ReferenceGroup` holds one parameter group: a flat parameter vector
(the group's parameters end to end) split into blocks ``[bounds[b], bounds[b+1])``.

The step, per group, ``t`` the number of finite steps taken so far plus one
(``T = update_period``, ``beta_p, beta_g = ema_decay``, ``r = pair_momentum``):

``variant="paper"`` (the default, Niu et al., TMLR 2023):

1. ``g = grad`` (``-grad`` under ``maximize``), then ``g = g + weight_decay * theta``:
   torch's order, so weight decay pulls toward zero when maximising too; entries
   whose parameter has no gradient count as 0 and none of them is written.
2. A non-finite ``g`` in ANY group of the optimizer (or ``GradScaler``'s
   ``found_inf != 0``) skips the whole step: only ``skipped_steps`` changes
   (``step(..., skip=True)`` models the verdict of the other groups).
3. Direction per block: ``d = H g`` by the two-loop recursion over the held
   pairs (``d = g`` while the history is empty).
4. ``d = d / ||d||`` over the group (``d`` stays as it is when ``||d|| = 0``):
   every step with ``normalize="always"`` (the default), once some block of the
   group holds a pair with ``normalize=True`` (the paper's rule), never with False.
5. ``buf = momentum * buf + d`` (``buf = d`` at the first step);
   ``theta_new = theta - lr * buf``.
6. EMAs with the parameters BEFORE the update: ``P = beta_p P + (1 - beta_p) theta``,
   ``G = beta_g G + (1 - beta_g) g``; at the first step ``P = theta``, ``G = g``.
7. ``t % T == 0``: per block, if snapshots exist, the pair ``s = P - P0``,
   ``y = G - G0``, pair momentum ``s = (1 - r) s + r s_last``,
   ``y = (1 - r) y + r yhat_last`` when a pair is held, Powell damping
   ``yhat = phi y + (1 - phi) s``, pushed if ``s.yhat > eps`` and finite, else
   counted as skipped; then ``P0 = P``, ``G0 = G``. A pair formed at step t is
   first used at step t + 1; the first forms at step 2T.
8. ``t = t + 1``.

``variant="released"``: the authors' released code (``BlockSlimQN``, "Block-wise
SLIM-QN"), checked line by line against it. Per step, in this order:

1. and 2. as above (``g = ±grad + weight_decay * theta``: the released code adds
   ``weight_decay * grad`` to the gradient it averages, a typo that is NOT
   reproduced; its direction already uses ``weight_decay * theta``).
3. EMAs with the parameters before the update and WITHOUT the ``(1 - beta)``
   factor (E1): ``P = beta_p P + theta``, ``G = beta_g G + g``; at the first
   step ``P = theta``, ``G = g``.
4. ``t % T == 0``, per block: the pair is formed and pushed exactly as in step 7
   above (momentum, damping, the curvature test) and the snapshots are taken,
   ``P0 = P``, ``G0 = G``; THEN the gradient average is reset to the current
   effective gradient, ``G = g`` (E2; the parameter average is not reset). So
   the next pair's ``y`` is measured from the average before the reset.
5. The direction, normalisation, heavy ball and parameter write of steps 3-5
   above, with the history as it stands after step 4: a pair formed at step t
   is already used at step t (E4); the first pair forms, and is first used, at
   step 2T.
6. ``t = t + 1``.

Where this differs from the released code (deliberately, so that both variants
share everything but E1, E2 and E4): the released code takes no snapshot at its
very first step, so with ``update_period=1`` its first snapshot is at step 2 and
its first pair at step 3 (here: steps 1 and 2; no difference for ``T > 1``); it
pushes every pair without the ``s.yhat > eps`` test; its ``H0`` is
``s.y / (y.y + 1e-12)``; and it divides by ``||d||`` without the zero guard.
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
    normalize="always",
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
    def __init__(self, theta: torch.Tensor, bounds, dtype=torch.float64, variant: str = "paper", **hyper):
        unknown = set(hyper) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown hyperparameters {sorted(unknown)}")
        if variant not in ("paper", "released"):
            raise ValueError(f"Invalid variant: {variant!r}")
        self.variant = variant
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

    def effective_gradient(self, grad: torch.Tensor, has_grad: torch.Tensor | None = None) -> torch.Tensor:
        """Step 1: ``g = grad`` (``-grad`` under ``maximize``) ``+ weight_decay * theta``, 0
        where ``has_grad`` (a bool mask of entries whose parameter has a gradient) is False."""
        h = self.h
        if has_grad is None:
            has_grad = torch.ones_like(self.theta, dtype=torch.bool)
        g = grad.to(self.theta.dtype)
        if h["maximize"]:
            g = -g
        g = g + h["weight_decay"] * self.theta
        return torch.where(has_grad, g, torch.zeros_like(g))

    def step(self, grad: torch.Tensor, has_grad: torch.Tensor | None = None, *, skip: bool = False) -> None:
        """One step. ``has_grad`` is a bool mask of entries whose parameter has a
        gradient; ``skip`` says another group's gradient (or AMP) was not finite."""
        h = self.h
        if has_grad is None:
            has_grad = torch.ones_like(self.theta, dtype=torch.bool)
        if not has_grad.any():
            return  # a group with no gradient at all is not stepped
        zero = torch.zeros_like(self.theta)

        # 1. the effective gradient; entries without a gradient count as zero
        g = self.effective_gradient(grad, has_grad)

        # 2. a non-finite gradient anywhere changes nothing but the counter
        if skip or not torch.isfinite(g).all():
            self.skipped_steps += 1
            return
        t = self.t + 1
        released = self.variant == "released"
        due = t % h["update_period"] == 0

        if released:
            # released 3. and 4.: averages without (1 - beta), then the pair (used at once)
            self._update_emas(g, has_grad, released=True)
            if due:
                self._push_pairs()
                self.grad_ema = torch.where(has_grad, g, self.grad_ema)  # E2, after the snapshot

        # 3. direction per block
        d = torch.cat([self.two_loop(g[sl], blk.pairs) for sl, blk in zip(self._slices(), self.blocks)])

        # 4. normalise over the whole group: always, or once any block holds a pair
        if h["normalize"] == "always" or (h["normalize"] and any(blk.pairs for blk in self.blocks)):
            norm = d.norm()
            if norm > 0:
                d = d / norm

        # 5. heavy ball, only where a gradient exists
        buf = d if self.buf is None else h["momentum"] * self.buf + d
        self.buf = torch.where(has_grad, buf, zero if self.buf is None else self.buf)
        new_theta = torch.where(has_grad, self.theta - h["lr"] * self.buf, self.theta)

        if not released:
            # 6. EMAs with the parameters before the update
            self._update_emas(g, has_grad, released=False)
        self.theta = new_theta

        # 7. curvature pairs every update_period steps
        if not released and due:
            self._push_pairs()

        # 8.
        self.t = t

    def _update_emas(self, g: torch.Tensor, has_grad: torch.Tensor, released: bool) -> None:
        beta_p, beta_g = self.h["ema_decay"]
        if self.param_ema is None:
            self.param_ema = self.theta.clone()
            self.grad_ema = torch.where(has_grad, g, torch.zeros_like(g))
            return
        if released:  # E1: no (1 - beta) factor
            p_new = beta_p * self.param_ema + self.theta
            g_new = beta_g * self.grad_ema + g
        else:
            p_new = beta_p * self.param_ema + (1 - beta_p) * self.theta
            g_new = beta_g * self.grad_ema + (1 - beta_g) * g
        self.param_ema = torch.where(has_grad, p_new, self.param_ema)
        self.grad_ema = torch.where(has_grad, g_new, self.grad_ema)

    def _push_pairs(self) -> None:
        for sl, blk in zip(self._slices(), self.blocks):
            self._push_pair(blk, self.param_ema[sl], self.grad_ema[sl])

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
