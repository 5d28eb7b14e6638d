"""The passes of each MLBFGS backend, callable one at a time for microbenchmarks.

``backend_phases(opt, m)`` returns ``{pass: (callable, floor_bytes)}`` for the backend
that steps the optimizer's first group, through its plan
(``MLBFGS.backend_plan``, the protocol of mlbfgs_fused/backends/__init__.py): the
same pass names on every backend (``gradient_dots``, ``two_loop``, ``update``,
``push``), so per-pass timings compare across backends. Each callable is one pass on
the optimizer's current state; the floor counts each tensor the pass must read or
write once (``floor_bytes``: float32 by default, docs/design.md, "Byte budget"). A
backend that fuses a pass into a neighbour (its plan's docstring says which) times
that pass as nearly nothing; ``push`` is a whole pair step through the passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlbfgs_fused import MLBFGS

PASS_NAMES = ("gradient_dots", "two_loop", "update", "push")


def floor_bytes(m: int, param_bytes: int = 4, history_bytes: int = 4,
                weight_decay: bool = False) -> dict[str, Callable[[int], int]]:
    """Bytes per pass at ``N`` elements (docs/design.md, "Byte budget"): each tensor the
    pass must read or write once, ``E = param_bytes``, ``H = history_bytes``; pass 1
    reads theta only with weight decay. ``step`` is a plain step, ``pair_step`` one
    that pushes a pair with the pair pushed inside pass 2 (its floor: pass 1 also reads
    theta, P, G, P0, G0 for the candidate's sums; pass 2 also reads P0, G0 and writes
    the ring slot and P0, G0)."""
    E, H = param_bytes, history_bytes
    dots = E + (E if weight_decay else 0) + 2 * m * H  # grad (theta), S, Y read
    update = 9 * E + 2 * m * H  # grad, theta, P, G, buf, S, Y read; theta, P, G, buf written
    pair = (6 * E + 2 * m * H) + (13 * E + 2 * m * H + 2 * H)
    return {
        "gradient_dots": lambda n: dots * n,
        "two_loop": lambda n: 0,  # scalars only
        "update": lambda n: update * n,
        # a step that pushes a pair, the passes it needs before it included
        "push": lambda n: pair * n,
        "step": lambda n: (dots + update) * n,
        "pair_step": lambda n: pair * n,
    }


def working_set_bytes(n: int, m: int, param_bytes: int = 4, history_bytes: int = 4) -> int:
    """The distinct bytes a step touches (the parameters, their gradients, the five
    per-element state vectors and the 2m ring rows): what decides which level of the
    memory hierarchy its passes stream from."""
    return (7 * param_bytes + 2 * m * history_bytes) * n


def backend_phases(opt: MLBFGS, m: int, floors: dict | None = None) -> dict[str, tuple[Callable[[], object], Callable[[int], int]]]:
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
        # sums come from this step's pass 1 (on the CUDA C++ backend, pass 2).
        set_steps(11 * period - 1)
        plan.gradient_dots(group, None)
        plan.update(group, ok, None)
        set_steps(11 * period - 1)
        capturable, group["capturable"] = group["capturable"], True  # foreach: no host-side skip
        try:
            plan.push(group, ok, None)
        finally:
            group["capturable"] = capturable

    floors = floor_bytes(m) if floors is None else floors
    passes = {
        "gradient_dots": lambda: plan.gradient_dots(group, None),
        "two_loop": lambda: plan.two_loop(group, ok),
        "update": lambda: plan.update(group, ok, None),
        "push": push,
    }
    return {name: (_no_grad(fn), floors[name]) for name, fn in passes.items()}


def _no_grad(fn):
    def run():
        with torch.no_grad():  # as inside step()
            return fn()

    return run
