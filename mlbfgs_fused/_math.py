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
    # The Gram matrix of the basis {g, s_0..s_{m-1}, y_0..y_{m-1}} (newest first):
    # the inner product of any two vectors in the span is c1^T basis_gram c2.
    basis_gram = torch.cat(
        [
            torch.cat([gg[:, None, None], Sg_k[:, None, :], Yg_k[:, None, :]], dim=2),
            torch.cat([Sg_k[:, :, None], SS, SY], dim=2),  # row i: s_i . {g, s_j, y_j}
            torch.cat([Yg_k[:, :, None], SY.transpose(1, 2), YY], dim=2),  # y_i . s_j = SY[j, i]
        ],
        dim=1,
    )
    one = torch.ones((), dtype=gram.dtype, device=gram.device)
    sy_diag = torch.diagonal(SY, dim1=1, dim2=2)
    rho = torch.where(held, one / torch.where(held, sy_diag, one), 0.0)

    # q (then r) = c . basis, starting from q = g.
    c = torch.zeros(B, 1 + 2 * m, dtype=gram.dtype, device=gram.device)
    c[:, 0] = 1
    alpha = torch.zeros(B, m, dtype=gram.dtype, device=gram.device)

    # First loop, newest to oldest: alpha_k = rho_k s_k.q ; q -= alpha_k y_k.
    for k in range(m):
        a = rho[:, k] * (basis_gram[:, 1 + k] * c).sum(-1)
        alpha[:, k] = a
        c[:, 1 + m + k] -= a

    # H0 = gamma I from the newest pair; 1 while the history is empty.
    any_held = held[:, 0]
    yy_newest = torch.where(any_held, YY[:, 0, 0], one)
    gamma = torch.where(any_held, SY[:, 0, 0] / yy_newest, one)
    c = c * gamma.unsqueeze(-1)

    # Second loop, oldest to newest: beta = rho_k y_k.r ; r += (alpha_k - beta) s_k.
    for k in reversed(range(m)):
        beta = rho[:, k] * (basis_gram[:, 1 + m + k] * c).sum(-1)
        c[:, 1 + k] += alpha[:, k] - beta

    d_dot_d = torch.einsum("bi,bij,bj->b", c, basis_gram, c)
    c_g, c_s, c_y = c[:, 0], c[:, 1 : 1 + m], c[:, 1 + m :]

    # Back to slot order.
    c_s = torch.zeros_like(c_s).scatter_(1, slots, c_s)
    c_y = torch.zeros_like(c_y).scatter_(1, slots, c_y)
    return c_g, c_s, c_y, d_dot_d


# Note [direction scale]
# Step 4 of docs/design.md ("The step"): the direction is divided by its norm over the
# whole group, ||d|| = sqrt(sum over blocks of d_b.d_b), found from the Gram matrices
# (no pass over d), and left as it is when ||d|| = 0. ``normalize`` says when:
#   "always"  every step, the SGD warm-up's d = g included: lr is the length of the step
#             (before momentum) from the first step on, whatever the scale of the loss
#             (the default);
#   True      once some block of the group holds a pair (the paper's rule: the warm-up
#             steps by lr * g, then by unit directions);
#   False     never.
# Every backend maps the value to one of these ints with :func:`normalize_mode` and
# computes the scale with the same rule (csrc/ops.h direction_scale is its C++ twin).
NORMALIZE_NEVER, NORMALIZE_AFTER_PAIR, NORMALIZE_ALWAYS = 0, 1, 2
NORMALIZE_VALUES = ("always", True, False)


def normalize_mode(normalize) -> int:
    """``normalize`` (``"always"``, True or False) as a ``NORMALIZE_*`` int."""
    if normalize == "always":
        return NORMALIZE_ALWAYS
    return NORMALIZE_AFTER_PAIR if normalize else NORMALIZE_NEVER


def direction_scale(d_dot_d: Tensor, pair_held: Tensor, mode: int) -> Tensor:
    """``1 / ||d||`` of Note [direction scale], from the group's ``||d||^2`` and whether
    any of its blocks holds a pair (0-dim tensors), with no branch on their values."""
    one = torch.ones_like(d_dot_d)
    if mode == NORMALIZE_NEVER:
        return one
    norm = d_dot_d.sqrt()
    due = norm > 0
    if mode == NORMALIZE_AFTER_PAIR:
        due = due & pair_held
    return torch.where(due, one / torch.where(norm > 0, norm, one), one)


def damping_factor(
    s_dot_y: Tensor, s_dot_s: Tensor, sigma_low: float, sigma_high: float, damping: float, eps: float
) -> Tensor:
    """phi of docs/design.md ("The step", 7), elementwise, with no branch on the value."""
    mu = s_dot_y / (s_dot_s + eps)
    one = torch.ones_like(mu)
    low = (1 - sigma_low) / torch.where(mu < sigma_low, 1 - mu, one)
    high = (sigma_high - 1) / torch.where(mu > sigma_high, mu - 1, one)
    phi = torch.where(mu < sigma_low, low, torch.where(mu > sigma_high, high, one))
    return torch.clamp(phi, max=1 - damping)
