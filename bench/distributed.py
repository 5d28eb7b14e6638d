"""Distributed ``MLBFGS`` and ``LBFGS`` on W processes: state per rank, bytes per collective, step time.

``python -m bench.distributed`` runs, for each backend (default: the fused backends and
foreach that run on the device: ``cpp`` and ``foreach`` on the CPU, ``triton``, ``cuda``
and ``foreach`` on CUDA), ``distributed=None`` at W = 1 as the baseline, then
``"sharded"`` and ``"blockwise"`` at each W (default 1 and 2), on an MLP-shaped
parameter set (about 0.75 M float32 parameters, one block per tensor, m = 10, T = 10, so
pair steps are timed too). On the CPU the ranks are gloo processes; with
``--device cuda`` they are NCCL processes, one GPU each (as many GPUs as the largest W).
Every rank steps the same replicated parameters with the same gradients (what
DistributedDataParallel hands it), so the numbers are the optimizer's alone. Per rank:

- state bytes: every tensor of the rank's ``optimizer.state_dict()`` (what it saves);
- every collective of a plain step and of a pair step, with its bytes, counted by
  wrapping ``torch.distributed.all_reduce`` and the all-gather (the payload on this
  rank: the all-reduced tensor, the all-gather's input);
- the median step time over the timed steps (every rank synchronised by a barrier
  before each step; the slowest rank's time is reported).

With as many processes as cores (two processes on a two-core machine) or more, the step
times measure the processes' contention for the cores, not how the step scales: only
the memory and communication columns carry over to a machine with a core, or a GPU,
per rank.

The LBFGS stage (``--optimizers``) runs ``LBFGS`` with ``distributed=None`` (every rank
keeps the whole history; at W > 1 the read vector is all-reduced) and ``"sharded"`` at
each W, on the same parameters, a drifting quadratic as the closure (5 iterations a step,
one evaluation each, m = 10): the state per rank, the collectives of a step with their
bytes (one all-reduce per evaluation, one all-gather per iteration that moves the
parameters), and the median step time (closure included: it is a few elementwise ops).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .machine import machine_stamp, results_dir

SHAPES = [(1000, 500), (500,), (500, 500), (500,), (500, 10), (10,)]
SMOKE_SHAPES = [(40, 30), (30,), (30, 10), (10,)]
HYPER = dict(lr=0.01, history_size=10, update_period=10, blocks="tensor")
# LBFGS: 5 iterations a step, one evaluation each (no line search), the tolerances off so
# that every step runs them all; m = 10 wraps within three steps.
LBFGS_HYPER = dict(lr=1, history_size=10, max_iter=5, tolerance_grad=0.0, tolerance_change=0.0)
COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor")
CONTENTION = (
    "{w} processes on {cores} cores: the step times measure contention for the cores, "
    "not scaling; the state and communication columns do not depend on it"
)


class Counter:
    """Every collective issued through ``torch.distributed``: ``(kind, bytes)`` in order."""

    def __init__(self):
        self.log: list[tuple[str, int]] = []
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        kind = "all_reduce" if name == "all_reduce" else "all_gather"

        def counted(*args, **kwargs):
            tensor = args[0] if kind == "all_reduce" else args[1]
            self.log.append((kind, tensor.numel() * tensor.element_size()))
            return original(*args, **kwargs)

        return counted


def _summary(calls: list[tuple[str, int]]) -> dict:
    """Bytes and calls per kind, and each call's bytes in order."""
    out = {"bytes": {"all_reduce": 0, "all_gather": 0}, "calls": {"all_reduce": 0, "all_gather": 0},
           "each": {"all_reduce": [], "all_gather": []}}
    for kind, nbytes in calls:
        out["bytes"][kind] += nbytes
        out["calls"][kind] += 1
        out["each"][kind].append(nbytes)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start(rank: int, world_size: int, init_method: str, device_type: str) -> tuple[torch.device, Counter]:
    """This rank's device and process group (gloo on the CPU, NCCL one GPU a rank), and
    the counter of its collectives."""
    torch.set_num_threads(1)
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=init_method, rank=rank, world_size=world_size)
    return device, Counter()


def _launch(worker, tag: str, w: int, out: str, args: tuple) -> list[dict]:
    """``worker`` on ``w`` processes meeting through a fresh file (no TCP port another run
    could take); each rank's result, from ``<out>/<tag>_<w>_<rank>.json``."""
    init_method = "file://" + str(Path(out, f"rendezvous_{tag}_{w}"))
    mp.spawn(worker, args=(w, init_method, *args, out), nprocs=w, join=True)
    return [json.loads(Path(out, f"{tag}_{w}_{r}.json").read_text()) for r in range(w)]


def _worker(rank: int, world_size: int, init_method: str, backend: str, mode: str | None, shapes, steps: int,
            device_type: str, out: str) -> None:
    device, counter = _start(rank, world_size, init_method, device_type)
    from mlbfgs_fused import MLBFGS

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    targets = [torch.randn(s, generator=gen).to(device) for s in shapes]
    kwargs = {} if mode is None else {"distributed": mode}
    opt = MLBFGS(params, backend=backend, **HYPER, **kwargs)
    for p in params:
        p.grad = torch.empty_like(p)
    T = HYPER["update_period"]
    times, plain, pair = [], None, None
    for t in range(steps):
        with torch.no_grad():
            for p, target in zip(params, targets):
                torch.sub(p, target, out=p.grad)  # the gradient of a quadratic
        _sync(device)
        dist.barrier()
        first = len(counter.log)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
        sent = _summary(counter.log[first:])
        if (t + 1) % T == 0 and t + 1 > T:
            pair = sent
        elif t > 0:
            plain = sent
    sd = opt.state_dict()
    state_bytes = 0
    for entry in sd["state"].values():
        for key, value in entry.items():
            tensors = [v for block in value for v in block.values()] if key == "blocks" else [value]
            state_bytes += sum(x.numel() * x.element_size() for x in tensors)
    timed = times[T:]  # after the first pair forms
    result = {"rank": rank, "state_bytes": state_bytes, "plain_step": plain, "pair_step": pair,
              "median_step_s": statistics.median(timed)}
    with open(os.path.join(out, f"{backend}_{mode}_{world_size}_{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _lbfgs_worker(rank: int, world_size: int, init_method: str, backend: str, mode: str | None, shapes,
                  steps: int, device_type: str, out: str) -> None:
    """``LBFGS`` on a drifting quadratic: every step starts from a perturbed target, so
    each runs its ``max_iter`` iterations (one evaluation each, no line search) with pair
    pushes into a wrapped ring. Every rank evaluates the same closure on the full
    parameters (what DDP's averaged gradients amount to)."""
    device, counter = _start(rank, world_size, init_method, device_type)
    from mlbfgs_fused import LBFGS

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    targets = [torch.randn(s, generator=gen).to(device) for s in shapes]
    curvature = [(0.5 + 1.5 * torch.rand(s, generator=gen)).to(device) for s in shapes]
    drift = [torch.randn(s, generator=gen).to(device) for s in shapes]
    kwargs = {} if mode is None else {"distributed": mode}
    opt = LBFGS(params, backend=backend, **LBFGS_HYPER, **kwargs)

    def closure():
        loss = torch.zeros((), device=device)
        for p, target, c in zip(params, targets, curvature):
            diff = p.detach() - target
            p.grad = c * diff  # the gradient of sum(c (p - target)^2) / 2
            loss += 0.5 * (c * diff * diff).sum()
        return loss

    times, sent, evals = [], None, 0
    for t in range(steps):
        with torch.no_grad():
            for target, d in zip(targets, drift):
                target.add_(d, alpha=0.1 * (1 if t % 2 else -1))
        _sync(device)
        dist.barrier()
        first, before = len(counter.log), opt.state[params[0]].get("func_evals", 0)
        start = time.perf_counter()
        opt.step(closure)
        _sync(device)
        times.append(time.perf_counter() - start)
        sent = _summary(counter.log[first:])
        evals = opt.state[params[0]]["func_evals"] - before
    sd = opt.state_dict()
    state_bytes = sum(v.numel() * v.element_size() for entry in sd["state"].values() for v in entry.values()
                      if isinstance(v, torch.Tensor))
    result = {"rank": rank, "state_bytes": state_bytes, "step": sent, "evaluations": evals,
              "pairs": int(opt.state[params[0]]["pair_count"]), "median_step_s": statistics.median(times[2:])}
    with open(os.path.join(out, f"lbfgs_{backend}_{mode}_{world_size}_{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def run_lbfgs(worlds=(1, 2), backends=None, smoke: bool = False, steps: int = 12,
              device_type: str = "cpu") -> list[dict]:
    """LBFGS's rows: ``distributed=None`` (every rank keeps the whole history; at W > 1
    the read vector is all-reduced) and ``"sharded"``, at each W."""
    import tempfile

    shapes = SMOKE_SHAPES if smoke else SHAPES
    backends = backends or default_backends(device_type)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for backend in backends:
            for mode in (None, "sharded"):
                for w in worlds:
                    ranks = _launch(_lbfgs_worker, f"lbfgs_{backend}_{mode}", w, out,
                                    (backend, mode, shapes, steps, device_type))
                    rows.append({
                        "optimizer": "LBFGS",
                        "backend": backend,
                        "mode": mode or "none",
                        "world_size": w,
                        "numel": sum(torch.Size(s).numel() for s in shapes),
                        "state_bytes_max_rank": max(r["state_bytes"] for r in ranks),
                        "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
                        "step": ranks[0]["step"],
                        "evaluations": ranks[0]["evaluations"],
                        "pairs": ranks[0]["pairs"],
                        "median_step_ms": 1e3 * max(r["median_step_s"] for r in ranks),
                    })
    return rows


def format_lbfgs_table(rows: list[dict], cores: int | None = None) -> str:
    lines = [
        "| backend | mode | W | state bytes / rank (max) | vs none W=1 | evaluations / step "
        "| all-reduces / step (B each) | all-gathers / step (rank's input, B each) | median step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = _ratio(r, rows)
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['world_size']} | {r['state_bytes_max_rank']:,} | {ratio} "
            f"| {r['evaluations']} | {_counted(r['step'], 'all_reduce')} | {_counted(r['step'], 'all_gather')} "
            f"| {r['median_step_ms']:.1f} |"
        )
    return _table(lines, rows, cores)


def _counted(step: dict | None, kind: str) -> str:
    """``5 x 8,137`` (calls of equal size), or each call's bytes, or ``-``."""
    each = (step or {}).get("each", {}).get(kind, [])
    if not each:
        return "-"
    if len(set(each)) == 1:
        return f"{len(each)} x {each[0]:,}"
    return " + ".join(f"{b:,}" for b in each)


def default_backends(device_type: str) -> tuple[str, ...]:
    """The backends that run on the device type (Triton's interpreter does not time)."""
    from mlbfgs_fused import backends

    wanted = ("triton", "cuda", "foreach") if device_type == "cuda" else ("cpp", "foreach")
    return tuple(name for name in wanted if backends.get(name).available()
                 and device_type in backends.get(name).supported_devices())


def run(worlds=(1, 2), backends=None, modes=("sharded", "blockwise"), smoke: bool = False, steps: int = 40,
        device_type: str = "cpu") -> list[dict]:
    import tempfile

    shapes = SMOKE_SHAPES if smoke else SHAPES
    backends = backends or default_backends(device_type)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for backend in backends:
            for mode in (None, *modes):
                for w in worlds:
                    if mode is None and w != 1:
                        continue
                    ranks = _launch(_worker, f"{backend}_{mode}", w, out, (backend, mode, shapes, steps, device_type))
                    rows.append({
                        "backend": backend,
                        "mode": mode or "none",
                        "world_size": w,
                        "numel": sum(torch.Size(s).numel() for s in shapes),
                        "blocks": len(shapes),
                        "state_bytes_max_rank": max(r["state_bytes"] for r in ranks),
                        "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
                        "plain_step": ranks[0]["plain_step"],
                        "pair_step": ranks[0]["pair_step"],
                        "median_step_ms": 1e3 * max(r["median_step_s"] for r in ranks),
                    })
    return rows


def _ratio(row: dict, rows: list[dict]) -> str:
    """The row's state per rank over its backend's ``distributed=None`` at W = 1."""
    base = next((x["state_bytes_max_rank"] for x in rows
                 if x["mode"] == "none" and x["world_size"] == 1 and x["backend"] == row["backend"]), None)
    return f"{row['state_bytes_max_rank'] / base:.3f}" if base else "-"


def _table(lines: list[str], rows: list[dict], cores: int | None) -> str:
    """The table's lines, and the contention note where the ranks outnumber the cores."""
    worlds = sorted({r["world_size"] for r in rows if r["world_size"] > 1})
    if cores is not None and worlds and max(worlds) >= cores:
        lines.append("")
        lines.append(CONTENTION.format(w=max(worlds), cores=cores).capitalize() + ".")
    return "\n".join(lines)


def _calls(step: dict | None, kind: str) -> str:
    """Each call's bytes, ``1,008 + 240 + 3,840``, or ``-``."""
    each = (step or {}).get("each", {}).get(kind, [])
    return " + ".join(f"{b:,}" for b in each) if each else "-"


def format_table(rows: list[dict], cores: int | None = None) -> str:
    lines = [
        "| backend | mode | W | state bytes / rank (max) | vs none | all-reduces of a plain step (B each) "
        "| of a pair step | all-gather per step (rank's input, B) | median step ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = _ratio(r, rows)
        gathered = (r["plain_step"] or {}).get("bytes", {}).get("all_gather", 0)
        lines.append(
            f"| {r['backend']} | {r['mode']} | {r['world_size']} | {r['state_bytes_max_rank']:,} | {ratio} "
            f"| {_calls(r['plain_step'], 'all_reduce')} | {_calls(r['pair_step'], 'all_reduce')} "
            f"| {gathered:,} | {r['median_step_ms']:.1f} |"
        )
    return _table(lines, rows, cores)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2", help="world sizes (default 1,2)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated backends (default: those that run on the device)")
    parser.add_argument("--modes", default="sharded,blockwise", help="distributed modes (default sharded,blockwise)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: gloo processes; cuda: NCCL processes, one GPU each")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--smoke", action="store_true", help="tiny parameters: checks that it runs")
    parser.add_argument("--optimizers", default="mlbfgs,lbfgs", help="which stages (default mlbfgs,lbfgs)")
    parser.add_argument("--lbfgs-steps", type=int, default=12, help="LBFGS steps per run (default 12)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/<machine>/distributed.json; none with --smoke)")
    args = parser.parse_args(argv)
    worlds = tuple(int(w) for w in args.worlds.split(","))
    backends = tuple(args.backends.split(",")) if args.backends else None
    modes = tuple(m for m in args.modes.split(",") if m)
    if args.device == "cuda" and torch.cuda.device_count() < max(worlds):
        parser.error(f"--device cuda at W = {max(worlds)} needs as many GPUs; {torch.cuda.device_count()} visible")
    device = torch.device(args.device)
    from .machine import cpu_count

    cores = None if args.device == "cuda" else cpu_count()
    stages = set(args.optimizers.split(","))
    rows = run(worlds, backends, modes, smoke=args.smoke, steps=args.steps, device_type=args.device) \
        if "mlbfgs" in stages else []
    lbfgs_rows = run_lbfgs(worlds, backends, smoke=args.smoke, steps=args.lbfgs_steps, device_type=args.device) \
        if "lbfgs" in stages else []
    table = format_table(rows, cores)
    lbfgs_table = format_lbfgs_table(lbfgs_rows, cores)
    print(table)
    print()
    print("LBFGS")
    print(lbfgs_table)
    out = args.out or (None if args.smoke else results_dir(device) / "distributed.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m bench.distributed " + shlex.join(argv if argv is not None else sys.argv[1:])
        record = {"machine": machine_stamp(device), "command": command.strip(), "steps": args.steps,
                  "hyper": HYPER, "shapes": SMOKE_SHAPES if args.smoke else SHAPES, "rows": rows,
                  "table": table, "lbfgs_steps": args.lbfgs_steps, "lbfgs_hyper": LBFGS_HYPER,
                  "lbfgs_rows": lbfgs_rows, "lbfgs_table": lbfgs_table}
        if cores is not None and max(worlds) >= cores:
            record["note"] = CONTENTION.format(w=max(worlds), cores=cores)
        out.write_text(json.dumps(record, indent=1))
        print(f"written {out}")
    return rows


if __name__ == "__main__":
    main()
