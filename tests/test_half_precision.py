"""float16 and bfloat16 parameters on the foreach backend: reductions in float32 or
wider (mlbfgs_fused/backends/foreach.py, Note [reductions in float32 or wider])."""

import pytest
import torch

from cases import BACKENDS, backend_device
from mlbfgs_fused import MLBFGS
from problems import run_against_reference, standard_scenario

# Relative error of the parameters after 20 steps against the float64 reference. The
# state is stored in the parameter dtype (11 and 8 significant bits), so the EMA
# differences s = P - P0 carry a relative rounding of about 2^-11 / 2^-8 times |P| / |s|:
# measured 0.7e-3 to 2.0e-3 (float16) and 0.6e-2 to 1.4e-2 (bfloat16).
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("blocks", ["group", 13], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_close_to_reference(dtype, blocks, variant):
    sc = standard_scenario(blocks, steps=20, seed=1, variant=variant, normalize=True)
    opt, groups, ref, errors = run_against_reference(sc, dtype, backend="foreach")
    assert max(errors) < TOLERANCE[dtype]
    block = opt.block_states(groups[0][0])[0]
    assert block["history_s"].dtype == dtype and int(block["pair_count"]) == 4
    assert int(block["skipped_steps"]) == 0


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


def test_bfloat16_history_with_float16_parameters():
    """A ring narrower-or-different from the parameters goes through the same chunked path."""
    sc = standard_scenario("tensor", steps=20, seed=2)
    _, _, _, errors = run_against_reference(sc, torch.float16, backend="foreach", history_dtype=torch.bfloat16)
    assert max(errors) < 3e-2


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
