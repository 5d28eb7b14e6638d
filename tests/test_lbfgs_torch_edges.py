"""LBFGS against torch.optim.LBFGS itself (float64) at every edge of torch's constructor and
closure protocol: the same iterates, the same ``func_evals`` and ``n_iter``, the same returned
losses, step after step."""

from __future__ import annotations

import math

import pytest
import torch

from cases import backend_params
from mlbfgs_fused import LBFGS

EDGES = {
    "defaults": dict(),
    "max_iter_1": dict(max_iter=1),
    # An explicit max_eval that torch's line search does not overrun (one that it would is
    # honoured exactly here: test_an_explicit_max_eval_holds_inside_the_line_search).
    "max_iter_1_max_eval_3": dict(max_iter=1, max_eval=3),
    "max_iter_4_max_eval_100": dict(max_iter=4, max_eval=100),
    "max_iter_0": dict(max_iter=0),
    "max_iter_2": dict(max_iter=2),
    "max_iter_3": dict(max_iter=3),
    "max_iter_7": dict(max_iter=7),
    "history_size_1": dict(history_size=1, max_iter=12),
    "lr_0": dict(lr=0.0, max_iter=4),  # with the line search: one step only (below)
    "tensor_lr": dict(lr=torch.tensor(0.5, dtype=torch.float64), max_iter=6),
    "tolerance_grad_0": dict(tolerance_grad=0.0, max_iter=6),
    "tolerance_grad_inf": dict(tolerance_grad=math.inf),
    "tolerance_grad_negative": dict(tolerance_grad=-1.0, max_iter=6),
    "tolerance_grad_nan": dict(tolerance_grad=math.nan, max_iter=6),
    "tolerance_change_0": dict(tolerance_change=0.0, max_iter=6),
    "tolerance_change_inf": dict(tolerance_change=math.inf),
    "tolerance_change_negative": dict(tolerance_change=-1.0, max_iter=6),
    "tolerance_change_nan": dict(tolerance_change=math.nan, max_iter=6),
    "converges_on_tolerance_change": dict(tolerance_change=1e-3, max_iter=30, history_size=4),
    "converges_on_tolerance_grad": dict(tolerance_grad=1e-2, max_iter=30, history_size=4),
}
CLOSURES = ("tensor", "float", "shape_1")
# Every edge on the portable and the C++ backends; through the Triton interpreter (about
# 5 s a step here), the edges that change what the passes are asked to do. The rest (the
# tolerances, a tensor lr, the closure's return type) are decided on the host, the same
# code on every backend.
BACKENDS = backend_params(["foreach", "cpp", "triton"])
TRITON_EDGES = ("max_iter_1", "max_iter_0", "history_size_1", "lr_0")


def _problem():
    """A smooth non-quadratic objective in float64 (a few quartic terms and a coupling)."""
    x = torch.tensor([1.5, -0.5, 2.0, 0.25, -1.25], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, 0.5, -1.0, 2.0, 0.0], dtype=torch.float64)

    def loss_fn():
        return ((x - c) ** 4).sum() + (x**2).sum() + 0.5 * (x[1:] * x[:-1]).sum()

    return x, loss_fn


def _run(cls, settings: dict, line_search_fn, closure_kind: str, steps: int = 4, **extra):
    x, loss_fn = _problem()
    opt = cls([x], line_search_fn=line_search_fn, **settings, **extra)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if closure_kind == "float":
            return float(loss)
        if closure_kind == "shape_1":
            return loss.reshape(1)
        return loss

    trace = []
    for _ in range(steps):
        returned = opt.step(closure)
        state = opt.state[x]
        trace.append((float(returned), state["func_evals"], state["n_iter"], x.detach().clone()))
        assert type(returned) is type(closure()), "step returns what the closure returned"
    return trace


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("closure_kind", CLOSURES)
@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_every_edge_matches_torch(edge, line_search_fn, closure_kind, backend):
    if backend == "triton" and (edge not in TRITON_EDGES or closure_kind != "tensor"):
        pytest.skip("the Triton interpreter: a few edges")
    settings = EDGES[edge]
    steps = 4
    if edge == "lr_0" and line_search_fn is not None:
        # torch's line search divides by zero at a second iteration with lr = 0 (its first
        # iteration's t is a tensor, later ones the float lr); ours does not.
        settings, steps = dict(settings, max_iter=1), 1
    theirs = _run(torch.optim.LBFGS, settings, line_search_fn, closure_kind, steps)
    ours = _run(LBFGS, settings, line_search_fn, closure_kind, steps, backend=backend)
    for step, ((f_t, evals_t, iters_t, x_t), (f_o, evals_o, iters_o, x_o)) in enumerate(zip(theirs, ours)):
        assert (evals_o, iters_o) == (evals_t, iters_t), f"step {step}"
        assert f_o == pytest.approx(f_t, rel=1e-10, abs=1e-300), f"step {step}"
        scale = float(x_t.abs().max())
        assert float((x_o - x_t).abs().max()) <= 1e-10 * scale, f"step {step}: {x_o} vs {x_t}"


def test_one_iteration_with_line_search_moves_the_parameters():
    """torch's default max_eval (max_iter * 5 // 4 = 1 here) does not stop its line search."""
    ours = _run(LBFGS, dict(max_iter=1), "strong_wolfe", "tensor", steps=1)
    theirs = _run(torch.optim.LBFGS, dict(max_iter=1), "strong_wolfe", "tensor", steps=1)
    x0, _ = _problem()
    assert not torch.equal(ours[0][3], x0.detach())
    assert ours[0][1] == theirs[0][1] == 2


def test_an_explicit_max_eval_holds_inside_the_line_search():
    """Set by the user, max_eval is honoured exactly (torch's line search may take one more)."""
    for max_iter, max_eval in [(1, 1), (5, 6), (3, 2)]:
        trace = _run(LBFGS, dict(max_iter=max_iter, max_eval=max_eval), "strong_wolfe", "tensor", steps=3)
        evals = [0] + [t[1] for t in trace]
        assert all(b - a <= max(max_eval, 1) for a, b in zip(evals, evals[1:]))
    trace = _run(LBFGS, dict(max_iter=1, max_eval=1), "strong_wolfe", "tensor", steps=1)
    x0, _ = _problem()
    assert trace[0][1] == 1 and torch.equal(trace[0][3], x0.detach())  # no evaluation left to try a step


def test_bad_arguments_in_torchs_wording():
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        LBFGS([x], lr=-1)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        LBFGS([x], lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(RuntimeError, match="only 'strong_wolfe' is supported"):
        LBFGS([x], line_search_fn="armijo")
    for key, value in (("max_iter", -1), ("history_size", 0), ("max_iter", 1.5), ("max_eval", -2)):
        with pytest.raises(ValueError, match=f"Invalid {key} value"):
            LBFGS([x], **{key: value})


@pytest.mark.parametrize("line_search_fn", [None, "strong_wolfe"])
@pytest.mark.parametrize("edge", list(EDGES))
def test_the_reference_matches_torch_at_every_edge(edge, line_search_fn):
    """The float64 reference (the kernels' ground truth) makes torch's decisions too."""
    from mlbfgs_fused.reference import ReferenceLBFGS

    settings = dict(EDGES[edge])
    steps = 4
    if edge == "lr_0" and line_search_fn is not None:
        settings, steps = dict(settings, max_iter=1), 1
    theirs = _run(torch.optim.LBFGS, settings, line_search_fn, "tensor", steps)
    x, loss_fn = _problem()

    def fg(value):
        with torch.no_grad():
            x.copy_(value)
        x.grad = None
        with torch.enable_grad():
            f = loss_fn()
            f.backward()
        return f.detach(), x.grad.clone()

    if isinstance(settings.get("lr"), torch.Tensor):
        settings["lr"] = float(settings["lr"])
    ref = ReferenceLBFGS(line_search_fn=line_search_fn, **settings)
    value = x.detach().clone()
    for step, (_, evals_t, iters_t, x_t) in enumerate(theirs):
        value = ref.step(value, fg)
        assert (ref.func_evals, ref.n_iter) == (evals_t, iters_t), f"step {step}"
        assert float((value - x_t).abs().max()) <= 1e-10 * float(x_t.abs().max()), f"step {step}"


def test_lr_0_with_the_line_search_steps_on():
    """torch divides by zero at a second iteration with lr = 0 and the line search; nothing moves here."""
    trace = _run(LBFGS, dict(lr=0.0, max_iter=3), "strong_wolfe", "tensor", steps=2)
    x0, _ = _problem()
    assert all(torch.equal(x, x0.detach()) for *_, x in trace)
