"""Whole-step comparison: every contender in one process on the same parameters and gradients.

For each N (and, at the largest N, each history size m) every contender of
:mod:`bench.contenders` is built on a fresh copy of one random problem, in
steady state, and the steps are timed round-robin (warm-up first, then one
step of each contender per round, median over rounds), so that load from
elsewhere on a shared machine falls on all of them alike. Rows carry
the time, the floor bytes of the contender's algorithm, the fraction of the
copy bandwidth measured in this run, and the ratio of the time to ours.
"""

from __future__ import annotations

import gc

import torch

from .contenders import contenders
from .problem import make_history, make_problem
from .timing import copy_bandwidth, load_average, time_interleaved

QUASI_NEWTON_KINDS = ("ours", "mL-BFGS peer", "L-BFGS peer", "out-of-place reference")


def repeats_for(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 30
    return 30 if n <= 10**5 else 15 if n <= 10**6 else 7


def compare_steps(device, sizes, history_sizes=(5, 10, 20), default_m=10, smoke=False, log=print) -> dict:
    bandwidth = copy_bandwidth(device, nbytes=1 << 20 if smoke else None, repeats=2 if smoke else 10)
    cases = [(n, default_m) for n in sizes] + [(sizes[-1], m) for m in history_sizes if m != default_m]
    candidates = contenders(device)
    rows = []
    for n, m in cases:
        problem = make_problem(n, device)
        history = make_history(n, m, device)
        chosen = [c for c in candidates if m == default_m or c.kind in QUASI_NEWTON_KINDS]  # first order: no m
        optimizers, restore = {}, {}
        for c in chosen:
            params = problem.fresh_params()
            optimizers[c.name] = c.build(params, history)
            if c.mutates_grad:
                restore[c.name] = lambda p=params, prob=problem: prob.restore_grads(p)
        load_before = load_average()
        timings = time_interleaved(
            {name: opt.step for name, opt in optimizers.items()}, device,
            repeats=2 if smoke else repeats_for(n, device), warmup=1 if smoke else 2, before_each=restore,
        )
        for c in chosen:
            timing = timings[c.name]
            floor = c.floor_bytes(n, m)
            rows.append({
                "contender": c.name, "kind": c.kind, "n": n, "m": m, **timing,
                "floor_bytes": floor,
                "fraction_of_copy_bandwidth": floor / timing["median_s"] / bandwidth["bytes_per_s"],
                "load_average": [load_before, load_average()],
            })
            log(f"  step N={n:.0e} m={m:2d} {c.name:22s} {timing['median_s'] * 1e3:10.3f} ms "
                f"(min {timing['min_s'] * 1e3:.3f})")
        del optimizers, restore, problem, history
        gc.collect()
    reference = candidates[0].name  # ours: Triton when it runs, else foreach
    for row in rows:
        ours = next(r for r in rows if r["contender"] == reference and (r["n"], r["m"]) == (row["n"], row["m"]))
        row["time_vs_ours"] = row["median_s"] / ours["median_s"]
    return {"bandwidth": bandwidth, "ours": reference, "rows": rows}
