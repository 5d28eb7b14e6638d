"""``python -m bench.lbfgs``: ``mlbfgs_fused.LBFGS`` and ``torch.optim.LBFGS`` side by side.

All contenders minimise the same cheap objective, ``f(x) = x.(a * x) / 2`` with ``a``
spread over ``[1, 1e3]``, whose closure costs two passes over ``x`` and allocates nothing
(it writes ``.grad`` and the loss into the same tensors every evaluation). The closure's
own time is measured inside every step (a wrapper times each call), so each row reports
the time per iteration with it (``total``) and without it (``optimizer``).

Per configuration (``N``, history ``m``, line search or not, iterations per ``step()``):
each contender first runs ``m + 2`` iterations (a full, wrapped history), then
``--repeats`` timed steps, round robin between the contenders; the median and the spread
(min .. max) of the per-iteration times are reported. ``--iters 1`` is the stochastic
pattern: one iteration per ``step()``, with torch's default ``max_eval`` without a line
search and ``max_eval=25`` with one (torch's default of 1 leaves the search one trial,
after which it stalls at ``t = 0`` on this problem). The tolerances are negative, so every
step runs all its iterations. After the timing, one more step of each contender runs under counters:
host reads (``aten._local_scalar_dense``, i.e. ``.item()``/``float()``/``bool()`` of a
tensor, plus ``Tensor.tolist`` calls) and storages allocated, per iteration.

Contenders: ``torch`` (``torch.optim.LBFGS``), ``ours`` (``mlbfgs_fused.LBFGS`` on its
default backend: C++ on the CPU, Triton on CUDA), ``ours-bf16`` (the same with
``history_dtype=torch.bfloat16``), ``ours-foreach`` (``backend="foreach"``).
``--device cuda`` runs them on a GPU (timed after a synchronisation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from mlbfgs_fused import LBFGS

from .machine import machine_stamp, results_dir

CONTENDERS = {
    "torch": ("torch.optim.LBFGS", lambda params, **kw: torch.optim.LBFGS(params, **kw)),
    "ours": ("mlbfgs_fused.LBFGS", lambda params, **kw: LBFGS(params, **kw)),
    "ours-bf16": ("mlbfgs_fused.LBFGS bfloat16 history",
                  lambda params, **kw: LBFGS(params, history_dtype=torch.bfloat16, **kw)),
    "ours-foreach": ("mlbfgs_fused.LBFGS foreach", lambda params, **kw: LBFGS(params, backend="foreach", **kw)),
}
DEFAULT_CONTENDERS = "torch,ours,ours-bf16"


class Quadratic:
    def __init__(self, n: int, dtype: torch.dtype, seed: int = 0, device: str | torch.device = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.logspace(0, 3, n, dtype=dtype)[torch.randperm(n, generator=g)].to(device)
        self.x0 = torch.randn(n, generator=g, dtype=dtype).to(device)

    def closure_for(self, x: torch.Tensor, clock: list | None = None):
        """A closure that writes ``.grad`` and the loss in place (no allocation); with
        ``clock``, its own time is added to ``clock[0]`` (synchronised on CUDA)."""
        grad = torch.empty_like(x)
        loss = torch.empty((), dtype=x.dtype, device=x.device)
        x.grad = grad

        def closure():
            t0 = time.perf_counter() if clock is not None else 0.0
            with torch.no_grad():
                torch.mul(self.a, x, out=grad)
                x.grad = grad  # in place: the same tensor every evaluation
                torch.dot(grad, x, out=loss)
                loss.mul_(0.5)
            if clock is not None:
                _sync(x.device)
                clock[0] += time.perf_counter() - t0
            return loss

        return closure


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_step(opt, closure, x) -> dict:
    """One step under the counters: host reads and allocations, per iteration."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from .memory import AllocationTracker

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    tolist = [0]
    original = torch.Tensor.tolist

    def counting_tolist(self):
        tolist[0] += 1
        return original(self)

    state = opt.state[x]
    before = (state["n_iter"], state["func_evals"])
    torch.Tensor.tolist = counting_tolist
    try:
        with Reads(), AllocationTracker() as tracker:
            opt.step(closure)
    finally:
        torch.Tensor.tolist = original
    iters = state["n_iter"] - before[0]
    return {
        "reads_per_iter": (Reads.count + tolist[0]) / iters,
        "scalar_reads_per_iter": Reads.count / iters,
        "tolist_per_iter": tolist[0] / iters,
        "evals_per_iter": (state["func_evals"] - before[1]) / iters,
        "allocations_per_iter": len(tracker.allocations) / iters,
        "allocated_bytes_per_iter": sum(a.nbytes for a in tracker.allocations) / iters,
    }


def measure(n: int, history: int, iters: int, repeats: int, line_search_fn, dtype,
            device: torch.device = torch.device("cpu"), contenders=tuple(DEFAULT_CONTENDERS.split(","))) -> dict:
    problem = Quadratic(n, dtype, device=device)
    runs = {}
    for key in contenders:
        _, make = CONTENDERS[key]
        x = problem.x0.clone().requires_grad_()
        clock = [0.0]
        closure = problem.closure_for(x, clock)
        settings = dict(history_size=history, tolerance_grad=-1.0, tolerance_change=-1.0,
                        line_search_fn=line_search_fn)
        if iters == 1:  # the stochastic pattern: one iteration a step
            # torch's default max_eval (1) leaves the line search one trial, after which it
            # stalls (t = 0 from about the tenth step on this problem): 25, its trial cap.
            opt = make([x], max_iter=1, max_eval=25 if line_search_fn else None, **settings)
            for _ in range(history + 2):
                opt.step(closure)
        else:
            opt = make([x], max_iter=history + 2, **settings)
            for group in opt.param_groups:  # torch's meaning of max_eval for every contender
                group["max_eval"] = 10 * (history + 2)
            opt.step(closure)  # warm-up: fill (and wrap) the history
            for group in opt.param_groups:
                group["max_iter"], group["max_eval"] = iters, 10 * iters
        runs[key] = dict(opt=opt, closure=closure, x=x, clock=clock, total=[], optimizer=[], evals=[])
    for _ in range(repeats):
        for key, r in runs.items():
            state = r["opt"].state[r["x"]]
            before = (state["n_iter"], state["func_evals"])
            r["clock"][0] = 0.0
            _sync(device)
            t0 = time.perf_counter()
            r["opt"].step(r["closure"])
            _sync(device)
            elapsed = time.perf_counter() - t0
            done = state["n_iter"] - before[0]
            r["total"].append(elapsed / done)
            r["optimizer"].append((elapsed - r["clock"][0]) / done)
            r["evals"].append((state["func_evals"] - before[1]) / done)
    row = {"n": n, "history": history, "line_search_fn": line_search_fn, "iters_per_step": iters,
           "dtype": str(dtype).replace("torch.", "")}
    for key, r in runs.items():
        name, _ = CONTENDERS[key]
        row[key] = {
            "name": name,
            "iter_s": statistics.median(r["total"]),
            "opt_iter_s": statistics.median(r["optimizer"]),
            "opt_iter_s_min": min(r["optimizer"]),
            "opt_iter_s_max": max(r["optimizer"]),
            "evals_per_iter": statistics.median(r["evals"]),
            "closure_s_per_eval": statistics.median(
                (t - o) / e for t, o, e in zip(r["total"], r["optimizer"], r["evals"])
            ),
            **count_step(r["opt"], r["closure"], r["x"]),
        }
        row[key]["eval_s"] = row[key]["iter_s"] / row[key]["evals_per_iter"]
    # Kept for tools that read the older rows (bench.gpu_check's summary).
    for key, old in (("torch", "torch.optim.LBFGS"), ("ours", "mlbfgs_fused.LBFGS")):
        if key in row:
            row[old] = row[key]
    return row


def _ms(x: float) -> str:
    return f"{1e3 * x:.3g}"


def table(rows: list[dict]) -> str:
    """Optimizer time per iteration (the closure's taken out), median [min..max], each
    contender's speed-up over torch, then the total with the closure and the counts."""
    keys = [k for k in CONTENDERS if rows and k in rows[0]]
    head = ["N", "m", "line search", "iters/step", "evals/iter"]
    for k in keys:
        head.append(f"{k} ms/iter [min..max]")
        if k != "torch":
            head.append(f"{k} speed-up")
    head += [f"{k} total ms/iter" for k in keys] + ["closure ms/eval"]
    head += [f"{k} reads, allocs /iter" for k in keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['n']:.0e}", str(r["history"]), r["line_search_fn"] or "none", str(r.get("iters_per_step", "")),
                 f"{r[keys[0]]['evals_per_iter']:.2g}"]
        base = r["torch"]["opt_iter_s"] if "torch" in r else None
        for k in keys:
            c = r[k]
            cells.append(f"{_ms(c['opt_iter_s'])} [{_ms(c['opt_iter_s_min'])}..{_ms(c['opt_iter_s_max'])}]")
            if k != "torch":
                cells.append(f"{base / c['opt_iter_s']:.2f}x" if base else "")
        cells += [_ms(r[k]["iter_s"]) for k in keys]
        cells.append(_ms(r[keys[0]]["closure_s_per_eval"]))
        cells += [f"{r[k]['reads_per_iter']:.3g}, {r[k]['allocations_per_iter']:.3g} "
                  f"({r[k]['allocated_bytes_per_iter'] / 1e6:.3g} MB)" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e4,1e5,1e6")
    parser.add_argument("--histories", default="10,100")
    parser.add_argument("--line-search", default="none,strong_wolfe", help="comma-separated of none, strong_wolfe")
    parser.add_argument("--iters", default="5,1", help="iterations per timed step(), comma-separated (1: one a step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--contenders", default=DEFAULT_CONTENDERS, help=f"comma-separated of {list(CONTENDERS)}")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", default=None, help="JSON file (default: bench/results/<machine>/lbfgs.json)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [1000] if args.smoke else [int(float(s)) for s in args.sizes.split(",")]
    histories = [3] if args.smoke else [int(h) for h in args.histories.split(",")]
    searches = [None] if args.smoke else [None if s == "none" else s for s in args.line_search.split(",")]
    modes = [2] if args.smoke else [int(i) for i in str(args.iters).split(",")]
    contenders = tuple(args.contenders.split(","))
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    rows = []
    for line_search_fn in searches:
        for iters in modes:
            for history in histories:
                for n in sizes:
                    rows.append(measure(n, history, iters, 1 if args.smoke else args.repeats, line_search_fn,
                                        dtype, device, contenders))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    if not args.smoke:
        out = args.out or results_dir(device) / "lbfgs.json"
        with open(out, "w") as f:
            command = argv if argv is not None else sys.argv[1:]
            json.dump({"machine": machine_stamp(device), "argv": command, "dtype": args.dtype,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
