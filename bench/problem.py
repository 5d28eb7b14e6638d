"""Random benchmark problems: parameters, gradients and a curvature history.

Never zeros: parameters and gradients are normal draws, and the history is a
set of pairs ``y_i = a * s_i`` for a random positive diagonal ``a``, as an
exact quadratic would produce, so every ``s_i . y_i > 0`` and the L-BFGS
operator built from them is positive definite (directions are descent directions).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# A model-like split: four weight tensors and their biases (shares of N).
WEIGHT_SHARES = (0.4, 0.3, 0.2, 0.1)


def parameter_sizes(numel: int) -> list[int]:
    bias = max(1, numel // 2000)
    weights_total = numel - bias * len(WEIGHT_SHARES)
    if weights_total < len(WEIGHT_SHARES):
        return [numel]
    weights = [int(weights_total * share) for share in WEIGHT_SHARES]
    weights[0] += weights_total - sum(weights)
    return [size for w in weights for size in (w, bias)]


@dataclass
class Problem:
    numel: int
    device: torch.device
    params: list[Tensor]  # initial values
    grads: list[Tensor]

    def fresh_params(self) -> list[torch.nn.Parameter]:
        """A new copy of the parameters with their gradients attached."""
        out = []
        for p, g in zip(self.params, self.grads):
            q = torch.nn.Parameter(p.clone())
            q.grad = g.clone()
            out.append(q)
        return out

    def restore_grads(self, params: list[Tensor]) -> None:
        torch._foreach_copy_([p.grad for p in params], self.grads)


def make_problem(numel: int, device: torch.device, seed: int = 0, dtype=torch.float32) -> Problem:
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = parameter_sizes(numel)
    params = [torch.randn(k, generator=gen, device=device, dtype=dtype) for k in sizes]
    grads = [torch.randn(k, generator=gen, device=device, dtype=dtype) for k in sizes]
    return Problem(numel, device, params, grads)


@dataclass
class History:
    """``m`` curvature pairs over ``N`` entries, oldest first (rows of ``S``, ``Y``)."""

    S: Tensor  # [m, N]
    Y: Tensor  # [m, N]

    @property
    def m(self) -> int:
        return self.S.shape[0]

    def rows(self) -> tuple[list[Tensor], list[Tensor]]:
        return list(self.S.unbind(0)), list(self.Y.unbind(0))


def make_history(numel: int, m: int, device: torch.device, seed: int = 1, dtype=torch.float32) -> History:
    gen = torch.Generator(device=device).manual_seed(seed)
    S = torch.randn(m, numel, generator=gen, device=device, dtype=dtype)
    curvature = 0.5 + torch.rand(numel, generator=gen, device=device, dtype=dtype)
    return History(S, S * curvature)
