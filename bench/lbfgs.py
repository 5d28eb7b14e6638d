"""``python -m bench.lbfgs``: ``mlbfgs_fused.LBFGS`` and ``torch.optim.LBFGS`` side by side.

Both minimise the same cheap objective, ``f(x) = x.(a * x) / 2`` with ``a`` spread over
``[1, 1e3]``, whose closure costs two passes over ``x`` (it writes ``.grad`` in place and
takes one dot), so the time is the optimizer's. Each optimizer first runs ``history + 2``
iterations (a full, wrapped history), then ``step()`` with ``max_iter = --iters`` is timed,
round robin between the optimizers, median of ``--repeats``. The tolerances are negative,
so every step runs all its iterations. Reported per iteration and per closure evaluation.
``--device cuda`` runs both on a GPU (timed after a synchronisation, as both read the
loss on the host every evaluation anyway).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mlbfgs_fused import LBFGS

from .machine import machine_stamp, results_dir

CONTENDERS = {"torch.optim.LBFGS": torch.optim.LBFGS, "mlbfgs_fused.LBFGS": LBFGS}


class Quadratic:
    def __init__(self, n: int, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.logspace(0, 3, n, dtype=dtype)[torch.randperm(n, generator=g)].to(device)
        self.x0 = torch.randn(n, generator=g, dtype=dtype).to(device)

    def closure_for(self, x: torch.Tensor):
        grad = torch.empty_like(x)

        def closure():
            with torch.no_grad():
                torch.mul(self.a, x, out=grad)
                x.grad = grad  # in place: the same tensor every evaluation
                return 0.5 * torch.dot(grad, x)

        return closure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(n: int, history: int, iters: int, repeats: int, line_search_fn, dtype,
            device: torch.device = torch.device("cpu")) -> dict:
    problem = Quadratic(n, dtype, device=device)
    runs = {}
    for name, cls in CONTENDERS.items():
        x = problem.x0.clone().requires_grad_()
        opt = cls([x], history_size=history, max_iter=history + 2, max_eval=10 * (history + 2),
                  tolerance_grad=-1.0, tolerance_change=-1.0, line_search_fn=line_search_fn)
        closure = problem.closure_for(x)
        opt.step(closure)  # warm-up: fill (and wrap) the history
        for group in opt.param_groups:
            group["max_iter"], group["max_eval"] = iters, 10 * iters
        runs[name] = (opt, closure, x, {"iter_s": [], "eval_s": []})
    for _ in range(repeats):
        for name, (opt, closure, x, times) in runs.items():
            state = opt.state[x]
            before = (state["n_iter"], state["func_evals"])
            _sync(device)
            t0 = time.perf_counter()
            opt.step(closure)
            _sync(device)
            elapsed = time.perf_counter() - t0
            times["iter_s"].append(elapsed / (state["n_iter"] - before[0]))
            times["eval_s"].append(elapsed / (state["func_evals"] - before[1]))
    closure = problem.closure_for(problem.x0.clone())
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        closure()
    _sync(device)
    closure_s = (time.perf_counter() - t0) / 10
    return {
        "n": n,
        "history": history,
        "line_search_fn": line_search_fn,
        "closure_s": closure_s,
        **{name: {key: statistics.median(v) for key, v in times.items()} for name, (_, _, _, times) in runs.items()},
    }


def table(rows: list[dict]) -> str:
    ours, theirs = "mlbfgs_fused.LBFGS", "torch.optim.LBFGS"
    lines = [
        "| N | history | line search | torch ms/iter | ours ms/iter | speed-up | torch ms/eval | ours ms/eval | closure ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:.0e} | {r['history']} | {r['line_search_fn'] or 'none'} "
            f"| {1e3 * r[theirs]['iter_s']:.3f} | {1e3 * r[ours]['iter_s']:.3f} "
            f"| {r[theirs]['iter_s'] / r[ours]['iter_s']:.2f}x "
            f"| {1e3 * r[theirs]['eval_s']:.3f} | {1e3 * r[ours]['eval_s']:.3f} | {1e3 * r['closure_s']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e4,1e5,1e6")
    parser.add_argument("--histories", default="10,100")
    parser.add_argument("--line-search", default="none", help="comma-separated of none, strong_wolfe")
    parser.add_argument("--iters", type=int, default=5, help="iterations per timed step()")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/<machine>/lbfgs.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [1000] if args.smoke else [int(float(s)) for s in args.sizes.split(",")]
    histories = [3] if args.smoke else [int(h) for h in args.histories.split(",")]
    searches = [None if s == "none" else s for s in args.line_search.split(",")]
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    rows = []
    for line_search_fn in searches:
        for history in histories:
            for n in sizes:
                rows.append(measure(n, history, 2 if args.smoke else args.iters,
                                    1 if args.smoke else args.repeats, line_search_fn, dtype, device))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if not args.smoke:
        out = args.out or results_dir(device) / "lbfgs.json"
        with open(out, "w") as f:
            json.dump({"machine": machine_stamp(device), "argv": argv, "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
