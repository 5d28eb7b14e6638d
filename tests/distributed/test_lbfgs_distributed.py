"""LBFGS under torch.distributed (gloo, two processes on the CPU): identical decisions on every rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from mlbfgs_fused import LBFGS

from dist_harness import spawn
from lbfgs_problems import _breast_cancer

KWARGS = dict(line_search_fn="strong_wolfe", history_size=5, max_iter=10)
STEPS = 3
WORLD = 2


def _fit(X, y, steps, average_gradients=False):
    torch.manual_seed(0)
    w = (0.1 * torch.randn(X.shape[1], dtype=torch.float64)).requires_grad_()
    opt = LBFGS([w], **KWARGS)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w, y)
        loss.backward()
        if average_gradients:  # what DDP does
            dist.all_reduce(w.grad)
            w.grad /= dist.get_world_size()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    state = opt.state[w]
    return w.detach(), state["func_evals"], state["n_iter"], losses


def _worker(rank, world_size, out_dir, X, y):
    half = X.shape[0] // world_size
    rows = slice(rank * half, (rank + 1) * half)
    torch.save(_fit(X[rows], y[rows], STEPS, average_gradients=True), os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()  # no rank tears gloo down while its peer still talks to it


def test_two_ranks_with_different_data_take_the_same_decisions(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    X, y = _breast_cancer()
    spawn(_worker, WORLD, str(tmp_path), X, y)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    (w0, evals0, iters0, losses0), (w1, evals1, iters1, losses1) = results
    assert losses0 != losses1  # each rank saw its own data
    assert (evals0, iters0) == (evals1, iters1)
    assert torch.equal(w0, w1)
    # Averaged losses and gradients make the run one process's fit on all the data.
    rows = slice(0, WORLD * (X.shape[0] // WORLD))
    w, evals, iters, _ = _fit(X[rows], y[rows], STEPS)
    assert (evals0, iters0) == (evals, iters)
    torch.testing.assert_close(w0, w, rtol=1e-9, atol=1e-12)
