"""The kernels of each MLBFGS backend, callable one at a time for microbenchmarks.

``backend_phases(opt)`` returns ``{name: (callable, floor_bytes)}`` for the
backend ``opt`` runs on; each callable is one phase of a step on the
optimizer's current state, and the floor counts each tensor the phase reads or
writes once (float32, per docs/design.md, "Byte budget"). The foreach backend's
phases and the native backends' ("cpp", "cuda": their ops) are exposed; the Triton
backend is timed as a whole step until it names its kernels.

This reaches into ``mlbfgs_fused.backends.foreach`` and ``.native``: if they are reorganised,
``make test`` (which runs every benchmark once) fails here first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mlbfgs_fused import MLBFGS


def foreach_phases(opt: MLBFGS, m: int) -> dict[str, tuple[Callable[[], object], Callable[[int], int]]]:
    from mlbfgs_fused.backends import foreach as _foreach
    from mlbfgs_fused.backends.foreach import group_direction_scale

    (group,) = opt.param_groups
    (arena,) = opt._group_arenas(0, group)
    step = _foreach.GroupStep(arena)
    ok = torch.ones((), dtype=torch.bool, device=arena.device)

    def dots():
        return _foreach._gradient_dots(arena)

    def coefficients():
        return _foreach.direction(arena, ok, dots())

    with torch.no_grad():
        d_scale = group_direction_scale([arena], [coefficients()[3]], group["normalize"], arena.device)

    def direction():
        _foreach.write_direction(arena, coefficients(), d_scale)

    return {
        # grad and theta read, g written
        "gather_gradient": (lambda: _foreach.gather_gradient(step, group["weight_decay"], False, None), lambda n: 12 * n),
        # pass 1: g, S, Y read once
        "gradient_dots": (dots, lambda n: (8 * m + 4) * n),
        # pass 1 and pass 2: g, S, Y read twice, d written (its norm from the Gram matrices)
        "direction": (direction, lambda n: (16 * m + 12) * n),
        # theta, P, G, g, buf, d read; theta, P, G, buf written
        "apply_update": (lambda: _foreach.apply_update(step, group, ok), lambda n: 40 * n),
        # run (masked) only on steps where a pair may be due; the floor is that of a step that pushes a pair:
        # P, P0, G, G0, the newest pair and S, Y (Gram update) read; a pair, P0, G0 written
        "push_pairs": (lambda: _foreach.push_pairs(arena, group, ok, arena.counters["step"]), lambda n: (8 * m + 40) * n),
    }


def native_phases(opt: MLBFGS, m: int) -> dict[str, tuple[Callable[[], object], Callable[[int], int]]]:
    """The passes of the native backends ("cpp", "cuda"): the ops a step calls."""
    (group,) = opt.param_groups
    (arena,) = opt._group_arenas(0, group)
    plan = arena.native.arenas[0]
    ok = torch.ones((), dtype=torch.bool, device=arena.device)
    step, period = arena.counters["step"], group["update_period"]
    due = step.clone().fill_(11 * period - 1)  # the counter of a step that forms a pair

    def push_due():
        step.copy_(due)  # every call pushes a pair (and rolls the snapshots)
        plan.update(group, ok, None, 0)  # the candidate's partial sums the push needs
        plan.push(group, ok)

    def update():
        step.copy_(due + 1)  # a plain step: no pair
        plan.update(group, ok, None, 0)

    return {
        # pass 1 (grad, S, Y read once) and the two-loop on the Gram matrices
        "gradient_dots": (lambda: plan.gradient_dots(group, None), lambda n: (8 * m + 4) * n),
        # pass 2: grad, theta, P, G, buf and S, Y read; theta, P, G, buf written
        "update": (update, lambda n: (8 * m + 36) * n),
        # a pair-forming step's pass 2 (with the candidate's sums: P0, G0 and the newest pair
        # read too) and the push (P, P0, G, G0, the newest pair and S, Y read; a pair, P0, G0
        # written)
        "update_and_push": (push_due, lambda n: (8 * m + 44 + 8 * m + 40) * n),
    }


PHASE_NAMES = {
    "foreach": ("gather_gradient", "gradient_dots", "direction", "apply_update", "push_pairs"),
    "cpp": ("gradient_dots", "update", "update_and_push"),
    "cuda": ("gradient_dots", "update", "update_and_push"),
}


def backend_phases(opt: MLBFGS, backend: str, m: int):
    if backend == "foreach":
        phases = foreach_phases(opt, m)
    elif backend in ("cpp", "cuda"):
        phases = native_phases(opt, m)
    else:
        phases = {}
    return {name: (_no_grad(fn), floor) for name, (fn, floor) in phases.items()}


def _no_grad(fn):
    def run():
        with torch.no_grad():  # as inside step()
            return fn()

    return run
