"""``lr`` means one step length from the first step on (``normalize="always"``, the
default; docs/design.md, "Step length").

The problem is PyTorch's own ``test_forloop_goes_right_direction`` (test/test_optim.py):
weight [10, 5], bias [10], a fixed input [5], loss ``sum((W x + b)^2)``, with the
schedulers torch's OptimizerInfo gives every optimizer (``StepLR(gamma=0.9,
step_size=10)`` with ``ReduceLROnPlateau()``, stepped on the loss), here also each
alone. MLBFGS with ``update_period=2, history_size=2, lr=0.01``: its first pair forms
at step 4, so the switch from the warm-up to the quasi-Newton direction happens early.

The bar: the loss never exceeds 1.5x its initial value and ends below a tenth of it,
with the loss as it is, scaled by 100 and by 1e-3.

Why 50 steps, not torch's 20: with ``lr`` a step length, heavy ball ``mu = 0.9`` moves
the parameters at most ``sum_t lr_t (1 - mu^t) / (1 - mu)`` in n steps: 1.2 in 20
steps, 4.1 in 50 (3.3 under StepLR). The loss falls below a tenth only once the
parameters have covered ``1 - 1/sqrt(10)``, 68%, of their distance to the solution
set (2.9 for this draw: 2.0), so 20 steps cannot meet the bar at lr = 0.01 and 50 can,
with room for a path that is not straight (measured: 0.0008 with no scheduler, 0.003
with StepLR). Across 30 draws of the problem the worst end ratio at 50 steps is 0.03
without a scheduler and 0.125 under StepLR (a draw 5.0 from its solutions); the test
uses torch's draw for seed 0, the issue's (initial loss 149).

The paper's rule (``normalize=True``) fails the same bar: the warm-up steps by
``lr * g``, the momentum buffer carries that scale past the first pair, and the loss
climbs 6-8x; with the loss x100 the warm-up diverges. Its test below shows that the
check can fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR

from cases import BACKENDS, backend_device
from mlbfgs_fused import MLBFGS

STEPS = 50
LR = 0.01
MAX_CLIMB = 1.5  # the loss never exceeds this multiple of its initial value
END_BELOW = 0.1  # and ends below this fraction of it

SCHEDULERS = {
    "none": (),
    "steplr": (lambda opt: StepLR(opt, gamma=0.9, step_size=10),),
    # torch's scheduler_inputs for every optimizer: both at once, the plateau on the loss
    "steplr+plateau": (lambda opt: StepLR(opt, gamma=0.9, step_size=10), lambda opt: ReduceLROnPlateau(opt)),
}
SCALES = (1.0, 100.0, 1e-3)


def losses(scheduler: str = "none", scale: float = 1.0, normalize="always", backend=None,
           device: str = "cpu", steps: int = STEPS) -> list[float]:
    """The loss before each step and after the last, as torch's test computes it."""
    gen = torch.Generator().manual_seed(0)  # the draw of torch.manual_seed(0): initial loss 149
    weight = torch.nn.Parameter(torch.randn(10, 5, generator=gen).to(device))
    bias = torch.nn.Parameter(torch.randn(10, generator=gen).to(device))
    x = torch.randn(5, generator=gen).to(device)
    kwargs = {} if normalize == "default" else {"normalize": normalize}
    opt = MLBFGS([weight, bias], lr=LR, update_period=2, history_size=2, backend=backend, **kwargs)
    schedulers = [make(opt) for make in SCHEDULERS[scheduler]]

    def closure():
        opt.zero_grad()
        loss = scale * (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    out = []
    for _ in range(steps):
        loss = closure().item()
        out.append(loss)
        opt.step()
        for sched in schedulers:
            sched.step(loss) if isinstance(sched, ReduceLROnPlateau) else sched.step()
    out.append(closure().item())
    return out


def climb_and_end(trajectory: list[float]) -> tuple[float, float]:
    """(highest loss, last loss), each over the initial loss; inf if it went non-finite."""
    first = trajectory[0]
    if not all(math.isfinite(v) for v in trajectory):
        return math.inf, math.inf
    return max(trajectory) / first, trajectory[-1] / first


def meets_the_bar(trajectory: list[float]) -> bool:
    climb, end = climb_and_end(trajectory)
    return climb <= MAX_CLIMB and end < END_BELOW


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: f"loss_x{s:g}")
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_the_default_meets_the_bar(scheduler, scale):
    """The default optimizer, as a user builds it (no normalize=, no backend=)."""
    trajectory = losses(scheduler, scale, normalize="default")
    climb, end = climb_and_end(trajectory)
    assert climb <= MAX_CLIMB, f"the loss climbed to {climb:.3g}x its initial value"
    assert end < END_BELOW, f"the loss ended at {end:.3g}x its initial value"


# The Triton interpreter takes about 0.1 s a step on the CPU: there, the first 16 steps
# (the switch at step 5, where the paper's rule starts its climb, and six pairs) are
# checked against the foreach backend's; on a GPU, and on every other backend, all 50.
INTERPRETED_STEPS = 16


def interpreted(backend: str) -> bool:
    if backend != "triton":
        return False
    from mlbfgs_fused.backends import triton

    return triton.interpreting()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_meets_the_bar(backend):
    """Each backend computes the rule in its own kernels: torch's schedulers together,
    the loss x100 (the case the paper's warm-up diverges on), and the same trajectory as
    the foreach backend's."""
    steps = INTERPRETED_STEPS if interpreted(backend) else STEPS
    trajectory = losses("steplr+plateau", 100.0, backend=backend, device=backend_device(backend), steps=steps)
    expected = losses("steplr+plateau", 100.0, backend="foreach", steps=steps)
    assert torch.allclose(torch.tensor(trajectory), torch.tensor(expected), rtol=1e-3, atol=1e-4 * expected[0])
    climb, end = climb_and_end(trajectory)
    assert climb <= MAX_CLIMB
    if steps == STEPS:
        assert end < END_BELOW


def test_the_loss_scale_does_not_change_the_steps():
    """Every step is lr long whatever the scale of the loss, the warm-up's d = g / ||g||
    included, so the loss curves over their initial values coincide. (Exactly here: the
    curvature of this problem is the same along every direction its gradients take, so
    the two-loop's direction is scale-free too. In general Powell damping compares s.y /
    s.s with fixed bounds and mixes 1% of s into y, so a pair's curvature depends on the
    scale; the length of the step does not.)"""
    curves = [torch.tensor(losses("steplr+plateau", scale)) / scale for scale in SCALES]
    for curve in curves[1:]:
        assert torch.allclose(curve, curves[0], rtol=1e-4, atol=1e-6 * curves[0][0].item())


def test_the_default_is_always():
    assert losses(steps=8, normalize="default") == losses(steps=8, normalize="always")


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_the_papers_rule_fails_the_bar(scheduler):
    """normalize=True (the paper's rule) is the climb the bar is there to catch: the
    warm-up steps by lr * g, then unit directions take over with the warm-up's momentum,
    and the loss climbs several times over; with the loss x100 the warm-up itself
    diverges (lr = 0.01 on a gradient of norm ~1e3)."""
    climb, _ = climb_and_end(losses(scheduler, 1.0, normalize=True))
    assert climb > 4 * MAX_CLIMB  # measured 6.3-8.5x
    assert not meets_the_bar(losses(scheduler, 1.0, normalize=True))
    climb, _ = climb_and_end(losses(scheduler, 100.0, normalize=True))
    assert climb > 1e6  # measured 6e13-2e14x
