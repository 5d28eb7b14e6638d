"""The benchmark's peers compute what they claim to, so that timing them means something."""

import torch

from bench.baselines import AuthorsStyleMLBFGS, TorchLBFGSDirection
from mlbfgs_fused.reference import ReferenceGroup


def _quadratic(n, seed):
    gen = torch.Generator().manual_seed(seed)
    curvature = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    target = torch.randn(n, generator=gen, dtype=torch.float64)
    return curvature, target


def test_authors_style_step_matches_the_reference():
    torch.manual_seed(0)
    sizes = [30, 17, 5]
    n = sum(sizes)
    curvature, target = _quadratic(n, 1)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, history_size=3, update_period=3)
    params = [torch.nn.Parameter(torch.randn(k)) for k in sizes]
    theta0 = torch.cat([p.detach().view(-1) for p in params]).double()
    ours = AuthorsStyleMLBFGS(params, **hyper)
    reference = ReferenceGroup(theta0, [0, n], **hyper)
    gen = torch.Generator().manual_seed(2)
    for _ in range(25):  # several pairs, a wrapped history, pair momentum and damping
        noise = 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
        theta = torch.cat([p.detach().view(-1) for p in params]).double()
        grad = curvature * (theta - target) + noise
        for p, g in zip(params, grad.split(sizes)):
            p.grad = g.float().clone()
        ours.step()
        reference.step(curvature * (reference.theta - target) + noise)
    assert len(ours.blocks[0].s_hist) == 3
    theta = torch.cat([p.detach().view(-1) for p in params]).double()
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
