"""float16 and bfloat16 parameters: sums of squares that overflow 16 bits are not taken
for non-finite gradients (foreach: reductions in float32 or wider,
mlbfgs_fused/backends/foreach.py, Note [reductions in float32 or wider]), and every
backend judges a pair on the averages as stored. Their trajectories against the float64
reference are tests/test_parity.py's (``test_precision_matches_reference``)."""

import pytest
import torch

from cases import BACKENDS, backend_device
from mlbfgs_fused import MLBFGS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_large_finite_half_gradients_are_never_skipped(dtype):
    """|g| = 300 over 4096 entries: g.g = 3.7e8 overflows float16 (max 65504) but must
    not look non-finite; 150 steps, none skipped, parameters finite, pairs formed."""
    gen = torch.Generator().manual_seed(0)
    n = 4096
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype))
    opt = MLBFGS([p], lr=0.01, update_period=10, history_size=4, backend="foreach")
    target = torch.randn(n, generator=gen)
    for _ in range(150):
        noise = torch.randn(n, generator=gen)
        p.grad = (300 * torch.sign(noise) + (p.detach().float() - target)).to(dtype)
        opt.step()
    block = opt.block_states(p)[0]
    assert int(block["skipped_steps"]) == 0 and int(block["step"]) == 150
    assert int(block["pair_count"]) > 0
    assert torch.isfinite(p).all()
    assert torch.isinf((p.grad.float().square().sum()).to(torch.float16))  # the sum does overflow in 16 bits


@pytest.mark.parametrize("normalize", [True, "always"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_pairs_are_judged_on_the_averages_as_stored(backend, normalize):
    """With float16 parameters a tiny step can leave a stored average unchanged, so the
    pair's ``s`` is 0 as stored while the unrounded one is not: every backend must judge
    the pair on the stored values (and skip it), never push a pair with ``s.y = 0``."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 20, generator=gen)
    A = (A @ A.T / 20 + torch.eye(20)).to(device)
    W = torch.nn.Parameter(torch.randn(4, 5, generator=gen).half().to(device))
    b = torch.nn.Parameter(torch.randn(5, generator=gen).half().to(device))
    opt = MLBFGS([W, b], backend=backend, update_period=2, history_size=2, blocks="tensor", lr=0.01,
                 normalize=normalize)
    for _ in range(10):
        opt.zero_grad()
        x = W.float().view(-1)
        (0.5 * x @ A @ x + 0.5 * (b.float() ** 2).sum()).backward()
        opt.step()
        assert torch.isfinite(W).all() and torch.isfinite(b).all()
    for p in (W, b):
        block = opt.block_states(p)[0]
        held = min(int(block["pair_count"]), 2)
        curvature = torch.diagonal(block["gram"][1])  # s_i . yhat_i per slot
        assert (curvature[:held] > 0).all(), p.shape
