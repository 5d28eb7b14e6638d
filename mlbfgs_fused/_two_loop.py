"""The vector-free two-loop recursion (Chen, Wang, Zhou, NeurIPS 2014), batched over blocks.

With the Gram matrices of the held pairs and the inner products ``S g``,
``Y g``, ``g.g``, the L-BFGS direction ``d = H g`` is a linear combination
``d = c_g g + sum_i (c_s[i] s_i + c_y[i] y_i)``; this module finds the
coefficients on scalars alone, in float64, with no branch on a device value
(empty histories and unheld ring slots are handled by masks). The Triton
coefficient kernel is a line-by-line port of :func:`two_loop_coefficients`.

Ring convention shared by every backend: the history of a block is an
``[m, n]`` ring; ``pair_count`` pairs were accepted so far; the newest sits in
slot ``(pair_count - 1) % m``; ``min(pair_count, m)`` slots are held.
``gram[b]`` is ``[3, m, m]``: ``S S^T``, ``S Y^T`` (``[i, j] = s_i . y_j``),
``Y Y^T`` in slot order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def newest_first_slots(pair_count: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Slots ordered newest to oldest, ``[B, m]``, and which of them are held."""
    k = torch.arange(m, device=pair_count.device)
    slots = torch.remainder(pair_count.unsqueeze(-1) - 1 - k, m)
    held = k < pair_count.unsqueeze(-1).clamp(max=m)
    return slots, held


def two_loop_coefficients(
    gram: Tensor, Sg: Tensor, Yg: Tensor, gg: Tensor, pair_count: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Coefficients of ``d = H g`` for ``B`` blocks at once.

    Args: ``gram`` ``[B, 3, m, m]``; ``Sg``, ``Yg`` ``[B, m]`` (slot order);
    ``gg`` ``[B]``; ``pair_count`` ``[B]`` (integer). All float64 but the count.

    Returns ``(c_g [B], c_s [B, m], c_y [B, m], d_dot_d [B])``, slot ordered;
    with no pair held, ``c_g = 1`` and the rest 0 (``d = g``, the SGD warm-up).
    """
    B, _, m, _ = gram.shape
    slots, held = newest_first_slots(pair_count, m)
    # Permute everything to newest-first order so loop index k is plain.
    idx_rows = slots.unsqueeze(-1).expand(B, m, m)
    idx_cols = slots.unsqueeze(-2).expand(B, m, m)

    def permute(mat: Tensor) -> Tensor:
        return mat.gather(1, idx_rows).gather(2, idx_cols)

    SS, SY, YY = permute(gram[:, 0]), permute(gram[:, 1]), permute(gram[:, 2])
    Sg_k, Yg_k = Sg.gather(1, slots), Yg.gather(1, slots)
    sy_diag = torch.diagonal(SY, dim1=1, dim2=2)
    one = torch.ones((), dtype=gram.dtype, device=gram.device)
    rho = torch.where(held, one / torch.where(held, sy_diag, one), 0.0)

    c_g = torch.ones(B, dtype=gram.dtype, device=gram.device)
    c_s = torch.zeros(B, m, dtype=gram.dtype, device=gram.device)
    c_y = torch.zeros(B, m, dtype=gram.dtype, device=gram.device)
    alpha = torch.zeros(B, m, dtype=gram.dtype, device=gram.device)

    # First loop, newest to oldest: alpha_k = rho_k s_k.q ; q -= alpha_k y_k.
    for k in range(m):
        s_dot_q = c_g * Sg_k[:, k] + (SS[:, k] * c_s).sum(-1) + (SY[:, k] * c_y).sum(-1)
        a = rho[:, k] * s_dot_q
        alpha[:, k] = a
        c_y[:, k] -= a

    # H0 = gamma I from the newest pair; 1 while the history is empty.
    any_held = held[:, 0]
    yy_newest = torch.where(any_held, YY[:, 0, 0], one)
    gamma = torch.where(any_held, SY[:, 0, 0] / yy_newest, one)
    c_g, c_s, c_y = gamma * c_g, gamma.unsqueeze(-1) * c_s, gamma.unsqueeze(-1) * c_y

    # Second loop, oldest to newest: beta = rho_k y_k.r ; r += (alpha_k - beta) s_k.
    for k in reversed(range(m)):
        y_dot_r = c_g * Yg_k[:, k] + (SY[:, :, k] * c_s).sum(-1) + (YY[:, k] * c_y).sum(-1)
        beta = rho[:, k] * y_dot_r
        c_s[:, k] += alpha[:, k] - beta

    # ||d||^2 as the quadratic form of the Gram matrix of {g, s_i, y_i}.
    d_dot_d = (
        c_g * c_g * gg
        + 2 * c_g * ((c_s * Sg_k).sum(-1) + (c_y * Yg_k).sum(-1))
        + torch.einsum("bi,bij,bj->b", c_s, SS, c_s)
        + 2 * torch.einsum("bi,bij,bj->b", c_s, SY, c_y)
        + torch.einsum("bi,bij,bj->b", c_y, YY, c_y)
    )

    # Back to slot order.
    c_s = torch.zeros_like(c_s).scatter_(1, slots, c_s)
    c_y = torch.zeros_like(c_y).scatter_(1, slots, c_y)
    return c_g, c_s, c_y, d_dot_d


def damping_factor(
    s_dot_y: Tensor, s_dot_s: Tensor, sigma_low: float, sigma_high: float, damping: float, eps: float
) -> Tensor:
    """phi of DESIGN.md section 2 step 7, elementwise, with no branch on the value."""
    mu = s_dot_y / (s_dot_s + eps)
    one = torch.ones_like(mu)
    low = (1 - sigma_low) / torch.where(mu < sigma_low, 1 - mu, one)
    high = (sigma_high - 1) / torch.where(mu > sigma_high, mu - 1, one)
    phi = torch.where(mu < sigma_low, low, torch.where(mu > sigma_high, high, one))
    return torch.clamp(phi, max=1 - damping)
