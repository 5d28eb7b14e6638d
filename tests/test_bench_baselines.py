"""The benchmark's peers compute what they claim to, so that timing them means something."""

import pytest
import torch

from bench.baselines import AuthorsStyleMLBFGS, TorchLBFGSDirection
from mlbfgs_fused.reference import ReferenceGroup

HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, history_size=3, update_period=3,
             ema_decay=(0.9, 0.8), pair_momentum=0.5)
# The authors' code normalises once a pair is held: the reference's normalize=True.
PAPER_RULE = dict(normalize=True)


def _quadratic(n, seed):
    gen = torch.Generator().manual_seed(seed)
    curvature = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    target = torch.randn(n, generator=gen, dtype=torch.float64)
    return curvature, target


def _released_expectation(theta, grad_of, steps, lr, momentum, weight_decay, history_size,
                          update_period, ema_decay, pair_momentum, damping=0.01, sigma_low=0.01,
                          sigma_high=1.5, eps=1e-12):
    """The authors' released step in float64, one block, in their code's order: the
    sums P, G (E1), then on a due step the pair, the snapshots and G = g (E2), then
    the direction with the new pair already in the history (E4)."""
    (beta_p, beta_g), r = ema_decay, pair_momentum
    P = G = P0 = G0 = buf = None
    pairs = []
    for t in range(1, steps + 1):
        g = grad_of(theta) + weight_decay * theta
        if P is None:
            P, G = theta.clone(), g.clone()
        else:
            P, G = beta_p * P + theta, beta_g * G + g
        if t % update_period == 0:
            if P0 is not None:
                s, y = P - P0, G - G0
                if pairs and r > 0:
                    s, y = (1 - r) * s + r * pairs[-1][0], (1 - r) * y + r * pairs[-1][1]
                mu = float(s.dot(y) / (s.dot(s) + eps))
                phi = 1.0
                if mu < sigma_low:
                    phi = (1 - sigma_low) / (1 - mu)
                elif mu > sigma_high:
                    phi = (sigma_high - 1) / (mu - 1)
                phi = min(phi, 1 - damping)
                yhat = phi * y + (1 - phi) * s
                if s.dot(yhat) > eps:
                    pairs = (pairs + [(s, yhat)])[-history_size:]
            P0, G0 = P.clone(), G.clone()
            G = g.clone()
        d = ReferenceGroup.two_loop(g, pairs)
        if pairs:
            d = d / d.norm()
        buf = d if buf is None else momentum * buf + d
        theta = theta - lr * buf
    return theta, len(pairs)


def _run_authors_style(sizes, curvature, target, noise, steps):
    params = [torch.nn.Parameter(torch.randn(k)) for k in sizes]
    theta0 = torch.cat([p.detach().view(-1) for p in params]).double()
    ours = AuthorsStyleMLBFGS(params, **HYPER)
    for t in range(steps):
        theta = torch.cat([p.detach().view(-1) for p in params]).double()
        grad = curvature * (theta - target) + noise[t]
        for p, g in zip(params, grad.split(sizes)):
            p.grad = g.float().clone()
        ours.step()
    return theta0, torch.cat([p.detach().view(-1) for p in params]).double(), ours


def test_authors_style_step_is_the_released_step():
    torch.manual_seed(0)
    sizes, steps = [30, 17, 5], 25  # several pairs, a wrapped history, pair momentum, damping
    n = sum(sizes)
    curvature, target = _quadratic(n, 1)
    noise = 0.1 * torch.randn(steps, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theta0, theta, ours = _run_authors_style(sizes, curvature, target, noise, steps)
    assert len(ours.blocks[0].s_hist) == 3

    calls = iter(range(steps))
    expected, held = _released_expectation(
        theta0, lambda th: curvature * (th - target) + noise[next(calls)], steps, **HYPER
    )
    assert held == 3
    error = (theta - expected).norm() / expected.norm()
    assert error < 1e-4, error

    # The released step is not the paper's: the comparison above can tell them apart.
    paper = ReferenceGroup(theta0, [0, n], **HYPER, **PAPER_RULE)
    for t in range(steps):
        paper.step(curvature * (paper.theta - target) + noise[t])
    assert (paper.theta - expected).norm() / expected.norm() > 1e-2


def test_authors_style_step_matches_the_released_reference():
    torch.manual_seed(0)
    sizes, steps = [30, 17, 5], 25
    n = sum(sizes)
    curvature, target = _quadratic(n, 3)
    noise = 0.1 * torch.randn(steps, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    theta0, theta, _ = _run_authors_style(sizes, curvature, target, noise, steps)
    try:
        reference = ReferenceGroup(theta0, [0, n], variant="released", **HYPER, **PAPER_RULE)
    except TypeError:
        pytest.skip("the reference has no variant='released' yet")
    for t in range(steps):
        reference.step(curvature * (reference.theta - target) + noise[t])
    error = (theta - reference.theta).norm() / reference.theta.norm()
    assert error < 1e-4, error


def test_torch_lbfgs_direction_matches_torch_optim_lbfgs():
    torch.manual_seed(0)
    n = 40
    curvature, target = _quadratic(n, 3)
    curvature, target = curvature.float(), target.float()
    ours_p = [torch.nn.Parameter(torch.randn(25)), torch.nn.Parameter(torch.randn(15))]
    torch_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]

    def loss_of(ps):
        theta = torch.cat([p.view(-1) for p in ps])
        return 0.5 * (curvature * (theta - target) ** 2).sum()

    ours = TorchLBFGSDirection(ours_p, lr=0.5, history_size=3)
    theirs = torch.optim.LBFGS(torch_p, lr=0.5, history_size=3, max_iter=1)

    def closure():
        theirs.zero_grad()
        loss = loss_of(torch_p)
        loss.backward()
        return loss

    for _ in range(12):
        for p in ours_p:
            p.grad = None
        loss_of(ours_p).backward()
        ours.step()
        theirs.step(closure)
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert len(ours.old_dirs) == 3
