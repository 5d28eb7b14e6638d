"""Distributed ``MLBFGS`` on W CPU processes (gloo): state per rank, bytes sent, step time.

``python -m bench.distributed`` runs W = 1, 2, 4 processes for each mode
(``distributed=None`` at W = 1 as the baseline, ``"sharded"``, ``"blockwise"``) on
an MLP-shaped parameter set (about 0.75 M float32 parameters, one block per tensor,
m = 10, T = 10, so pair steps are timed too). Every rank steps the same replicated
parameters with the same gradients (what DistributedDataParallel hands it), so the
numbers are the optimizer's alone. It reports per rank:

- state bytes: every tensor of the rank's ``optimizer.state_dict()`` (what it saves);
- bytes communicated per step, counted by wrapping ``torch.distributed.all_reduce``
  and the all-gather (payload of each call on this rank: the all-reduced tensor, the
  all-gather's input), on a plain step and on a pair step;
- the median step time over the timed steps (every rank synchronised by a barrier
  before each step; the slowest rank's time is reported).

On a machine with fewer cores than W the step times measure contention as much as the
optimizer; the memory and communication columns do not depend on it.
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
COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor")


class Counter:
    """Bytes and calls of each collective issued through ``torch.distributed``."""

    def __init__(self):
        self.bytes = {"all_reduce": 0, "all_gather": 0}
        self.calls = {"all_reduce": 0, "all_gather": 0}
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        kind = "all_reduce" if name == "all_reduce" else "all_gather"

        def counted(*args, **kwargs):
            tensor = args[0] if kind == "all_reduce" else args[1]
            self.bytes[kind] += tensor.numel() * tensor.element_size()
            self.calls[kind] += 1
            return original(*args, **kwargs)

        return counted

    def snapshot(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}


def _diff(after: dict, before: dict) -> dict:
    return {k: {c: after[k][c] - before[k][c] for c in after[k]} for k in after}


def _worker(rank: int, world_size: int, port: int, mode: str | None, shapes, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    counter = Counter()
    from mlbfgs_fused import MLBFGS

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    targets = [torch.randn(s, generator=gen) for s in shapes]
    kwargs = {} if mode is None else {"distributed": mode}
    opt = MLBFGS(params, backend="foreach", **HYPER, **kwargs)
    for p in params:
        p.grad = torch.empty_like(p)
    T = HYPER["update_period"]
    times, plain, pair = [], None, None
    for t in range(steps):
        with torch.no_grad():
            for p, target in zip(params, targets):
                torch.sub(p, target, out=p.grad)  # the gradient of a quadratic
        dist.barrier()
        before = counter.snapshot()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        sent = _diff(counter.snapshot(), before)
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
    with open(os.path.join(out, f"{mode}_{world_size}_{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(worlds=(1, 2, 4), modes=(None, "sharded", "blockwise"), smoke: bool = False, steps: int = 40) -> list[dict]:
    import tempfile

    shapes = SMOKE_SHAPES if smoke else SHAPES
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in modes:
            for w in worlds:
                if mode is None and w != 1:
                    continue
                mp.spawn(_worker, args=(w, _free_port(), mode, shapes, steps, out), nprocs=w, join=True)
                ranks = [json.loads(Path(out, f"{mode}_{w}_{r}.json").read_text()) for r in range(w)]
                rows.append({
                    "mode": mode or "none",
                    "world_size": w,
                    "numel": sum(torch.Size(s).numel() for s in shapes),
                    "state_bytes_max_rank": max(r["state_bytes"] for r in ranks),
                    "state_bytes_per_rank": [r["state_bytes"] for r in ranks],
                    "plain_step": ranks[0]["plain_step"],
                    "pair_step": ranks[0]["pair_step"],
                    "median_step_ms": 1e3 * max(r["median_step_s"] for r in ranks),
                })
    return rows


def format_table(rows: list[dict]) -> str:
    base = next((r["state_bytes_max_rank"] for r in rows if r["mode"] == "none"), None)
    lines = [
        "| mode | W | state bytes / rank (max) | vs W=1 | all-reduce B/step (calls) | pair step all-reduce B (calls) "
        "| all-gather B/step | median step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain, pair = r["plain_step"] or {}, r["pair_step"] or {}
        pb, pc = plain.get("bytes", {}), plain.get("calls", {})
        qb, qc = pair.get("bytes", {}), pair.get("calls", {})
        ratio = f"{r['state_bytes_max_rank'] / base:.3f}" if base else "-"
        lines.append(
            f"| {r['mode']} | {r['world_size']} | {r['state_bytes_max_rank']:,} | {ratio} "
            f"| {pb.get('all_reduce', 0):,} ({pc.get('all_reduce', 0)}) "
            f"| {qb.get('all_reduce', 0):,} ({qc.get('all_reduce', 0)}) "
            f"| {pb.get('all_gather', 0):,} | {r['median_step_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default="1,2,4", help="world sizes (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default 40)")
    parser.add_argument("--smoke", action="store_true", help="tiny parameters: checks that it runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/<machine>/distributed.json; none with --smoke)")
    args = parser.parse_args(argv)
    worlds = tuple(int(w) for w in args.worlds.split(","))
    rows = run(worlds, smoke=args.smoke, steps=args.steps)
    table = format_table(rows)
    print(table)
    out = args.out or (None if args.smoke else results_dir(torch.device("cpu")) / "distributed.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m bench.distributed " + shlex.join(argv if argv is not None else sys.argv[1:])
        record = {"machine": machine_stamp(torch.device("cpu")), "command": command.strip(),
                  "steps": args.steps, "hyper": HYPER, "shapes": SMOKE_SHAPES if args.smoke else SHAPES,
                  "rows": rows, "table": table}
        out.write_text(json.dumps(record, indent=1))
        print(f"written {out}")
    return rows


if __name__ == "__main__":
    main()
