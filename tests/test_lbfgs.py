"""LBFGS against torch.optim.LBFGS itself (float64), its float64 reference, and its extensions."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlbfgs_fused import LBFGS
from mlbfgs_fused.reference import ReferenceLBFGS

from lbfgs_problems import PROBLEMS, run

SETTINGS = {
    "default": dict(max_iter=20, max_eval=40),
    "short": dict(max_iter=5, max_eval=12, tolerance_grad=1e-5, tolerance_change=1e-12),
    "loose": dict(max_iter=8, max_eval=20, tolerance_grad=1e-3, tolerance_change=1e-4),
}


def _relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(float(x.abs().max()) for x in a)
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / scale


class _OneUlpLater(torch.optim.LBFGS):
    """torch.optim.LBFGS started one unit in the last place away: how far rounding alone carries."""

    def __init__(self, params, **kwargs):
        params = list(params)
        with torch.no_grad():
            for p in params:
                p.mul_(1 + 2.0**-52)
        super().__init__(params, **kwargs)


# Parameters agree "to rounding": LBFGS forms the direction from the Gram matrix, torch from
# vectors, so the two round differently from the first pair on. The rounding differences grow
# along the trajectory exactly as a one-ulp change of the starting point does in torch itself, so
# the bound is ten times that change (and at least 1e-12 relative). The counters must be equal.
CASES = [
    (problem, line_search_fn, history_size, setting)
    for problem, line_search_fn in itertools.product(PROBLEMS, [None, "strong_wolfe"])
    for history_size, setting in [(3, "default"), (100, "short"), (3, "loose")]
] + [(problem, "strong_wolfe", 100, "default") for problem in ("rosenbrock", "mlp")]


@pytest.mark.parametrize("problem,line_search_fn,history_size,setting", CASES)
def test_matches_torch_lbfgs(problem, line_search_fn, history_size, setting):
    kwargs = dict(SETTINGS[setting], line_search_fn=line_search_fn, history_size=history_size)
    steps = 3
    p_torch, s_torch, l_torch, _ = run(torch.optim.LBFGS, problem, steps, **kwargs)
    p_ours, s_ours, l_ours, _ = run(LBFGS, problem, steps, **kwargs)
    assert (s_ours["func_evals"], s_ours["n_iter"]) == (s_torch["func_evals"], s_torch["n_iter"])
    if history_size == 3:
        assert s_ours["n_iter"] > 3  # the ring wrapped
    diff = _relative_difference(p_torch, p_ours)
    loss_diff = max(abs(a - b) / abs(a) for a, b in zip(l_torch, l_ours))
    if max(diff, loss_diff) > 1e-12:
        p_ulp, _, l_ulp, _ = run(_OneUlpLater, problem, steps, **kwargs)
        assert diff <= 10 * _relative_difference(p_torch, p_ulp)
        assert loss_diff <= max(1e-10, 10 * max(abs(a - b) / abs(a) for a, b in zip(l_torch, l_ulp)))
