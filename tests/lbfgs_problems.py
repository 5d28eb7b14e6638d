"""Full-batch problems for LBFGS's parity tests against torch.optim.LBFGS (float64)."""

from __future__ import annotations

import functools

import torch


def rosenbrock(n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1.5).requires_grad_()

    def loss():
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    return [x], loss


@functools.lru_cache(maxsize=1)
def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    return X, torch.tensor(y, dtype=torch.float64)


def logistic_regression(seed: int = 0):
    """Logistic regression on scikit-learn's breast_cancer, standardised, with a small L2 term."""
    X, y = _breast_cancer()
    g = torch.Generator().manual_seed(seed)
    w = (0.1 * torch.randn(X.shape[1], generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def loss():
        logits = X @ w + b
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 1e-3 * w.dot(w)

    return [w, b], loss


def least_squares(rows: int = 60, cols: int = 25, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(0, 1.5, cols, dtype=torch.float64)
    b = torch.randn(rows, generator=g, dtype=torch.float64)
    x = torch.randn(cols, generator=g, dtype=torch.float64).requires_grad_()

    def loss():
        return 0.5 * ((A @ x - b) ** 2).sum()

    return [x], loss


def mlp(seed: int = 0):
    """A 2-layer tanh MLP regressing a smooth target, full batch."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(128, 4, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(1, keepdim=True)) + 0.1 * X[:, :1] ** 2
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()

    def loss():
        return torch.nn.functional.mse_loss(model(X), y)

    return list(model.parameters()), loss


PROBLEMS = {
    "rosenbrock": rosenbrock,
    "logistic": logistic_regression,
    "least_squares": least_squares,
    "mlp": mlp,
}


def run(cls, problem: str, steps: int, groups=None, **kwargs):
    """Build ``problem``, step ``cls`` ``steps`` times; return (params, state of the first
    parameter, losses returned by step)."""
    params, loss_fn = PROBLEMS[problem]()
    opt = cls(groups(params) if groups else params, **kwargs)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    return [p.detach().clone() for p in params], opt.state[params[0]], losses, opt


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(x.abs().max()) for x in a)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


class OneUlpLater(torch.optim.LBFGS):
    """torch.optim.LBFGS started one unit in the last place away: how far rounding alone carries."""

    def __init__(self, params, **kwargs):
        params = list(params)
        with torch.no_grad():
            for p in params:
                p.mul_(1 + 2.0**-52)
        super().__init__(params, **kwargs)


def check_against_torch(cls, problem: str, steps: int, tolerance: float, ours=None, **kwargs):
    """``cls`` (with the extra arguments ``ours``) against torch.optim.LBFGS on ``problem``:
    the counters equal, the parameters and losses within ``tolerance`` relative, or else
    within ten times how far a one-ulp change of torch's own start carries (the vector-free
    two-loop rounds otherwise than torch's vectors from the first pair on, and the
    difference grows along the trajectory as that change does). Returns (our state of the
    first parameter, our optimizer)."""
    p_torch, s_torch, l_torch, _ = run(torch.optim.LBFGS, problem, steps, **kwargs)
    p_ours, s_ours, l_ours, opt = run(cls, problem, steps, **(ours or {}), **kwargs)
    assert (s_ours["func_evals"], s_ours["n_iter"]) == (s_torch["func_evals"], s_torch["n_iter"])
    diff = relative_difference(p_torch, p_ours)
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(l_torch, l_ours))
    if max(diff, loss_diff) > tolerance:
        p_ulp, _, l_ulp, _ = run(OneUlpLater, problem, steps, **kwargs)
        assert diff <= 10 * relative_difference(p_torch, p_ulp)
        assert loss_diff <= max(1e-10, 10 * max(abs(a - b) / abs(a) for a, b in zip(l_torch, l_ulp)))
    return s_ours, opt
