"""The kernels of each MLBFGS backend, callable one at a time for microbenchmarks.

``backend_phases(opt)`` returns ``{name: (callable, floor_bytes)}`` for the
backend ``opt`` runs on; each callable is one phase of a step on the
optimizer's current state, and the floor counts each tensor the phase reads or
writes once (float32, per docs/design.md, "Byte budget"). Only the foreach backend's
phases are exposed today; the Triton backend is timed as a whole step until it
names its kernels.

This reaches into ``mlbfgs_fused.backends.foreach``: if that module is reorganised,
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


def backend_phases(opt: MLBFGS, backend: str, m: int):
    phases = foreach_phases(opt, m) if backend == "foreach" else {}
    return {name: (_no_grad(fn), floor) for name, (fn, floor) in phases.items()}


def _no_grad(fn):
    def run():
        with torch.no_grad():  # as inside step()
            return fn()

    return run
