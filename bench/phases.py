"""The passes of each MLBFGS backend, callable one at a time for microbenchmarks.

``backend_phases(opt, m)`` returns ``{pass: (callable, floor_bytes)}`` for the backend
that steps the optimizer's first group, through its plan
(``MLBFGS.backend_plan``, the protocol of mlbfgs_fused/backends/__init__.py): the
same pass names on every backend (``gradient_dots``, ``two_loop``, ``update``,
``push``), so per-pass timings compare across backends. Each callable is one pass on
the optimizer's current state; the floor counts each tensor the pass must read or
write once (float32, docs/design.md, "Byte budget"). A backend that fuses a pass into
a neighbour (its plan's docstring says which) times that pass as nearly nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlbfgs_fused import MLBFGS

PASS_NAMES = ("gradient_dots", "two_loop", "update", "push")


def floor_bytes(m: int) -> dict[str, Callable[[int], int]]:
    """Bytes per pass at ``N`` elements, float32 parameters and history, no weight decay."""
    return {
        "gradient_dots": lambda n: (8 * m + 4) * n,  # grad, S, Y read once
        "two_loop": lambda n: 0,  # scalars only
        "update": lambda n: (8 * m + 36) * n,  # grad, theta, P, G, buf, S, Y read; theta, P, G, buf written
        # a step that pushes a pair: P, P0, G, G0 and S, Y read; a pair, P0, G0 written
        "push": lambda n: (8 * m + 32) * n,
    }


def backend_phases(opt: MLBFGS, m: int) -> dict[str, tuple[Callable[[], object], Callable[[int], int]]]:
    group = opt.param_groups[0]
    plan = opt.backend_plan(0)
    assert plan.prepare(group)
    ok = {d: torch.ones((), dtype=torch.bool, device=d) for d in plan.devices}
    steps = [block["step"] for p in group["params"] for block in opt.block_states(p)]
    period = group["update_period"]

    def set_steps(value: int) -> None:
        for step in steps:
            step.fill_(value)

    def push() -> None:
        # A pair forms at every call: the counter names a due step, and the candidate's
        # sums come from this step's pass 1 (and, on the C++ backends, pass 2).
        set_steps(11 * period - 1)
        plan.gradient_dots(group, None)
        plan.update(group, ok, None)
        set_steps(11 * period - 1)
        capturable, group["capturable"] = group["capturable"], True  # foreach: no host-side skip
        try:
            plan.push(group, ok, None)
        finally:
            group["capturable"] = capturable

    floors = floor_bytes(m)
    passes = {
        "gradient_dots": lambda: plan.gradient_dots(group, None),
        "two_loop": lambda: plan.two_loop(group, ok),
        "update": lambda: plan.update(group, ok, None),
        "push": push,
    }
    # A pair step's push includes the passes it needs before it: its floor does too.
    dots, update, pair = floors["gradient_dots"], floors["update"], floors["push"]
    floors["push"] = lambda n: dots(n) + update(n) + pair(n)
    return {name: (_no_grad(fn), floors[name]) for name, fn in passes.items()}


def _no_grad(fn):
    def run():
        with torch.no_grad():  # as inside step()
            return fn()

    return run
