"""``python -m bench.lbfgsb``: time to solution of ``mlbfgs_fused.LBFGS(bounds=...)`` (L-BFGS-B)
against ``scipy.optimize.minimize(method="L-BFGS-B")``, in float64 on the CPU.

The problem: ``f(x) = sum a_i (x_i - c_i)^2 / 2 + b sum (x_{i+1} - x_i)^2 / 2`` over the box
``[0, 1]^N``, ``a`` spread over ``[1, 100]``, ``c`` uniform in ``[-0.5, 1.5]`` (about half the
bounds are active at the solution), ``b = 1`` couples neighbours. Its closure is a few
passes over ``x`` in torch (the same for both: scipy's calls it on ``torch.from_numpy(x)``
and takes the gradient back as a NumPy array, so scipy's time includes its host round
trips: NumPy in, NumPy out, every evaluation). Both run to the same tolerances (scipy's
``gtol``, ``ftol`` = LBFGS's ``tolerance_grad``, ``tolerance_change``) with the same
``maxcor`` = ``history_size``; each run starts from the same point, round robin between the
two (after one untimed run of each at ``N = 1e3`` and a garbage collection before each
timed one), ``--repeats`` times; the median and the spread (min, max) of the wall time
are reported with the evaluations, iterations and the final objective of each.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np
import scipy.optimize
import torch

from mlbfgs_fused import LBFGS

from .machine import machine_stamp, results_dir


class BoxProblem:
    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.logspace(0, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
        self.c = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5
        self.x0 = torch.rand(n, generator=g, dtype=torch.float64)
        self.b = 1.0

    def fg(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``f(x)`` (a 0-dim tensor); ``grad`` filled in place."""
        r = x - self.c
        dx = x[1:] - x[:-1]
        torch.mul(self.a, r, out=grad)
        grad[1:] += self.b * dx
        grad[:-1] -= self.b * dx
        return 0.5 * (torch.dot(self.a * r, r) + self.b * torch.dot(dx, dx))


def run_ours(problem: BoxProblem, m: int, gtol: float, ftol: float) -> dict:
    x = problem.x0.clone().requires_grad_()
    grad = torch.empty_like(x)

    def closure():
        with torch.no_grad():
            loss = problem.fg(x, grad)
        x.grad = grad
        return loss

    opt = LBFGS([x], bounds=(0.0, 1.0), history_size=m, max_iter=15000, max_eval=15000,
                tolerance_grad=gtol, tolerance_change=ftol)
    t0 = time.perf_counter()
    opt.step(closure)
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        f = float(problem.fg(x, grad))
    state = opt.state[x]
    return {"s": elapsed, "nfev": state["func_evals"], "nit": state["n_iter"], "f": f}


def run_scipy(problem: BoxProblem, m: int, gtol: float, ftol: float) -> dict:
    grad = torch.empty_like(problem.x0)

    def fun(x):
        f = problem.fg(torch.from_numpy(x), grad)
        return float(f), grad.numpy().copy()

    t0 = time.perf_counter()
    res = scipy.optimize.minimize(fun, problem.x0.numpy().copy(), jac=True, method="L-BFGS-B",
                                  bounds=scipy.optimize.Bounds(np.zeros(problem.x0.numel()), np.ones(problem.x0.numel())),
                                  options=dict(maxcor=m, gtol=gtol, ftol=ftol, maxiter=15000, maxfun=15000))
    elapsed = time.perf_counter() - t0
    return {"s": elapsed, "nfev": int(res.nfev), "nit": int(res.nit), "f": float(res.fun)}


CONTENDERS = {"scipy L-BFGS-B": run_scipy, "mlbfgs_fused.LBFGS": run_ours}


def measure(n: int, m: int, repeats: int, gtol: float, ftol: float) -> dict:
    problem = BoxProblem(n)
    runs = {name: [] for name in CONTENDERS}
    for name, run in CONTENDERS.items():
        run(BoxProblem(min(n, 1000)), m, gtol, ftol)  # warm-up: imports, first calls
    for _ in range(repeats):
        for name, run in CONTENDERS.items():
            gc.collect()  # the other's garbage is not collected inside this one's timing
            runs[name].append(run(problem, m, gtol, ftol))
    row = {"n": n, "history": m}
    for name, results in runs.items():
        times = [r["s"] for r in results]
        row[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "times_s": times, **{k: results[-1][k] for k in ("nfev", "nit", "f")}}
    return row


def table(rows: list[dict]) -> str:
    ours, theirs = "mlbfgs_fused.LBFGS", "scipy L-BFGS-B"
    lines = [
        "| N | history | scipy s (min-max) | ours s (min-max) | scipy / ours | scipy evals | ours evals "
        "| scipy iters | ours iters | f relative difference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r[theirs], r[ours]
        lines.append(
            f"| {r['n']:.0e} | {r['history']} | {a['median_s']:.3f} ({a['min_s']:.3f}-{a['max_s']:.3f}) "
            f"| {b['median_s']:.3f} ({b['min_s']:.3f}-{b['max_s']:.3f}) | {a['median_s'] / b['median_s']:.2f}x "
            f"| {a['nfev']} | {b['nfev']} | {a['nit']} | {b['nit']} "
            f"| {abs(a['f'] - b['f']) / abs(a['f']):.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e3,1e4,1e5,1e6")
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gtol", type=float, default=1e-5)
    parser.add_argument("--ftol", type=float, default=1e7 * float(np.finfo(float).eps))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/<machine>/lbfgsb.json)")
    parser.add_argument("--smoke", action="store_true", help="a tiny size: checks that it runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [300] if args.smoke else [int(float(s)) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        rows.append(measure(n, 3 if args.smoke else args.history, 1 if args.smoke else args.repeats,
                            args.gtol, args.ftol))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if not args.smoke:
        out = args.out or results_dir(torch.device("cpu")) / "lbfgsb.json"
        with open(out, "w") as f:
            json.dump({"machine": machine_stamp(torch.device("cpu")), "argv": argv, "threads": torch.get_num_threads(),
                       "gtol": args.gtol, "ftol": args.ftol, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
