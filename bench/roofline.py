"""The roofline: every backend's passes and whole step against the machine's own bandwidth.

``python -m bench.roofline`` (also the ``roofline`` stage of ``bench.run``) times, for every
MLBFGS backend that runs here, each pass of ``bench/phases.py`` (``gradient_dots``,
``two_loop``, ``update``, ``push``: a pair step through the passes), the whole ``step()`` and
a whole pair step, at N = 1e3 .. 1e7, m = 5, 10, 20, with a float32 and a bfloat16 history
(the fused backends), on 1 and 2 threads (the default backend), and writes
``roofline.json`` and ``roofline.md`` into ``bench/results/<machine>/``.

Per row: the median time and its spread (quartiles), the bytes the pass must move
(``bench.phases.floor_bytes``, docs/design.md "Byte budget"), GB/s, and the fraction of the
bandwidth of a copy whose footprint equals the step's working set
(``bench.phases.working_set_bytes``), timed in the same round-robin as the step: the
bandwidth the machine gives data of that size. The copy is also timed at three named
footprints, from the cache sizes the OS reports: L2 (half of it), the last-level cache
(eight times L2, below half of it) and DRAM (a copy larger than the last-level cache).
Beside them, per (N, m): torch.optim.LBFGS's two-loop (``bench/baselines/torch_lbfgs.py``)
and, at the smallest N, torch's ``AdamW(fused=True)`` on the same parameters: the fixed cost.

Everything is timed round-robin within a case (one warm call, then a few timed calls, per
item and round), so a slow spell of a shared machine falls on all of a case's items alike;
the 1-minute load average is recorded before and after each case. Passes are reached
through each backend's own plan (``MLBFGS.backend_plan``), the steps through ``step()``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .baselines import TorchLBFGSDirection
from .contenders import HYPER, build_mlbfgs, mlbfgs_backend_works
from .machine import default_device, machine_stamp, results_dir
from .phases import PASS_NAMES, backend_phases, floor_bytes, working_set_bytes
from .problem import make_history, make_problem
from .timing import load_average, synchronize

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
CUDA_SIZES = (10**3, 10**5, 10**6, 10**7, 10**8)

HISTORY_SIZES = (5, 10, 20)
THREADS = (1, 2)
HISTORY_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
ITEMS = (*PASS_NAMES, "step", "pair_step")


def default_sizes(device: torch.device, max_n: float | None = None) -> list[int]:
    """N = 1e3 (the fixed cost) to 1e7 on the CPU, to 1e8 on CUDA."""
    sizes = CUDA_SIZES if device.type == "cuda" else SIZES
    return [n for n in sizes if max_n is None or n <= max_n]


# -- the machine --------------------------------------------------------------------------
def cache_bytes() -> dict[str, int]:
    """L2 (per core) and last-level cache sizes as the OS reports them (sysfs), with
    common defaults where it does not."""
    sizes = {"L2": 1 << 20, "LLC": 32 << 20}
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    levels = {}
    for index in sorted(root.glob("index*")) if root.exists() else []:
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
        levels[level] = int(text.rstrip("KMG")) * scale
    if 2 in levels:
        sizes["L2"] = levels[2]
    if levels:
        sizes["LLC"] = levels[max(levels)]
    return sizes


def level_footprints(caches: dict[str, int]) -> dict[str, int]:
    """The footprint (source + destination) of the copy that stands for each level."""
    l2, llc = caches["L2"], caches["LLC"]
    return {
        "L2": l2 // 2,
        "LLC": max(l2 * 2, min(8 * l2, llc // 2)),
        "DRAM": min(max(2 * llc, 256 << 20), 2 << 30),
    }


def level_of(footprint: int, caches: dict[str, int]) -> str:
    return "L2" if footprint <= caches["L2"] else "LLC" if footprint <= caches["LLC"] else "DRAM"


class Copy:
    """``dst.copy_(src)`` over ``footprint`` bytes (source and destination together);
    bytes moved per call: the footprint."""

    def __init__(self, footprint: int, device: torch.device):
        n = max(footprint // 8, 1024)
        self.src = torch.randn(n, device=device)
        self.dst = torch.empty_like(self.src)
        self.bytes = 8 * n

    def __call__(self) -> None:
        self.dst.copy_(self.src)


# -- timing -------------------------------------------------------------------------------
@dataclass
class Item:
    name: str
    fn: Callable[[], object]
    bytes: int = 0
    before: Callable[[], object] | None = None
    samples: list | None = None


def time_round_robin(items: list[Item], device: torch.device, rounds: int, per_round: int) -> None:
    """Each round: per item one warm call, then ``per_round`` timed calls (``before`` runs
    outside the timed region). Samples go to ``item.samples``."""
    for item in items:
        item.samples = []
    for _ in range(rounds):
        for item in items:
            for timed in range(per_round + 1):
                if item.before is not None:
                    item.before()
                synchronize(device)
                t0 = time.perf_counter()
                item.fn()
                synchronize(device)
                if timed:
                    item.samples.append(time.perf_counter() - t0)


def summary(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "q1_s": q[0], "q3_s": q[2],
            "min_s": min(samples), "max_s": max(samples), "samples": len(samples)}


def repeats(step_seconds: float, smoke: bool) -> tuple[int, int]:
    """(rounds, timed calls per round): about 0.4 s of timed steps per item, 5 to 200 calls,
    in 5 rounds (a slow spell of a shared machine then spoils one round of every item)."""
    if smoke:
        return 1, 1
    calls = int(min(200, max(5, 0.4 / max(step_seconds, 1e-6))))
    return 5, max(1, calls // 5)


# -- one case: (N, m, threads), every backend and history dtype ----------------------------
@dataclass(frozen=True)
class Variant:
    backend: str
    history: str  # a key of HISTORY_DTYPES

    @property
    def name(self) -> str:
        return self.backend + ("" if self.history == "float32" else f"-{self.history}-history")


def _pair_step(opt) -> tuple[Callable[[], None], Callable[[], None]]:
    """A step that forms a pair, and what runs before it (outside the timing): the step
    counters set, through the state views of ``optimizer.state``, to a step that forms
    one. ``capturable`` is on for the step, so the foreach backend's host-side probe of
    the counter (which does not see this write) cannot skip the pair."""
    group = opt.param_groups[0]
    steps = [b["step"] for p in group["params"] for b in opt.block_states(p)]
    value = 11 * group["update_period"] - 1

    def set_due():
        for s in steps:
            s.fill_(value)

    def step():
        capturable, group["capturable"] = group["capturable"], True
        try:
            opt.step()
        finally:
            group["capturable"] = capturable

    return step, set_due


def _accepted(opt) -> int:
    """Pairs accepted so far, over the group's blocks."""
    group = opt.param_groups[0]
    return sum(int(b["pair_count"]) for p in group["params"] for b in opt.block_states(p))


def run_case(device, n: int, m: int, threads: int, variants: list[Variant], baselines: bool,
             adamw: bool, caches: dict, smoke: bool, log=print, dram_footprint: int | None = None) -> list[dict]:
    """Every item of one (N, m, threads), round-robin. Beside the copy at the working set's
    footprint, a case whose working set is beyond L2 also times the copy larger than the
    last-level cache (``dram_footprint``), the reference of the out-of-cache target."""
    torch.set_num_threads(threads)
    problem = make_problem(n, device)
    history = make_history(n, m, device)
    items: list[Item] = []
    owners: dict[str, tuple] = {}
    for v in variants:
        opt = build_mlbfgs(v.backend, history_dtype=HISTORY_DTYPES[v.history])(problem.fresh_params(), history)
        H = 2 if v.history != "float32" else 4
        floors = floor_bytes(m, 4, H, weight_decay=HYPER["weight_decay"] != 0)
        for name, (fn, floor) in backend_phases(opt, m, floors).items():
            items.append(Item(f"{v.name}:{name}", fn, floor(n)))
        items.append(Item(f"{v.name}:step", opt.step, floors["step"](n)))
        pair_step, set_due = _pair_step(opt)
        items.append(Item(f"{v.name}:pair_step", pair_step, floors["pair_step"](n), before=set_due))
        owners[v.name] = (v, opt, H)
    ws = working_set_bytes(n, m)
    copy = Copy(ws, device)
    items.append(Item("copy:working_set", copy, copy.bytes))
    level = level_of(ws, caches)
    if dram_footprint is not None and level != "L2":
        dram = Copy(dram_footprint, device)
        items.append(Item("copy:DRAM", dram, dram.bytes))
    if baselines:
        torch_lbfgs = TorchLBFGSDirection(problem.fresh_params(), lr=HYPER["lr"], history_size=m)
        torch_lbfgs.load_steady_state(*history.rows())
        items.append(Item("torch-lbfgs-two-loop:step", torch_lbfgs.step, 0))
    if adamw:
        opt = torch.optim.AdamW(problem.fresh_params(), lr=1e-3, weight_decay=HYPER["weight_decay"], fused=True)
        opt.step()
        items.append(Item("adamw-fused:step", opt.step, 28 * n))
    # A probe sets the repeats: the slowest whole step of the case.
    probe = max((i for i in items if i.name.endswith(":step")), key=lambda i: i.bytes)
    t0 = time.perf_counter()
    probe.fn()
    synchronize(device)
    rounds, per_round = repeats(time.perf_counter() - t0, smoke)
    accepted_before = {name: _accepted(opt) for name, (_, opt, _) in owners.items()}
    load_before = load_average()
    time_round_robin(items, device, rounds, per_round)
    load_after = load_average()
    rows = []
    copy_item = next(i for i in items if i.name == "copy:working_set")
    copy_rate = copy_item.bytes / summary(copy_item.samples)["median_s"]
    dram_item = next((i for i in items if i.name == "copy:DRAM"), None)
    for item in items:
        variant, _, what = item.name.partition(":")
        s = summary(item.samples)
        row = {"n": n, "m": m, "threads": threads, "contender": variant, "item": what, **s,
               "bytes": item.bytes, "working_set_bytes": ws, "level": level,
               "copy_bytes_per_s": copy_rate, "load_average": [load_before, load_after]}
        if dram_item is not None:
            row["dram_copy_bytes_per_s"] = dram_item.bytes / summary(dram_item.samples)["median_s"]
        if variant in owners:
            v, opt, H = owners[variant]
            row.update(backend=v.backend, history_dtype=v.history)
            if what == "pair_step":
                row["pairs_accepted"] = _accepted(opt) - accepted_before[variant]
                row["pair_steps"] = rounds * (per_round + 1)
        if item.bytes:
            row["bytes_per_s"] = item.bytes / s["median_s"]
            row["fraction_of_copy"] = row["bytes_per_s"] / copy_rate
        rows.append(row)
        log(f"  N={n:.0e} m={m:2d} t={threads} {item.name:42s} {s['median_s'] * 1e3:9.4f} ms "
            f"[{s['q1_s'] * 1e3:.4f}, {s['q3_s'] * 1e3:.4f}]"
            + (f" {100 * row['fraction_of_copy']:5.1f}% of copy" if "fraction_of_copy" in row else ""))
    return rows


def measure_levels(device, footprints: dict[str, int], threads: int, smoke: bool) -> dict[str, dict]:
    """The copy bandwidth of each named level, interleaved."""
    torch.set_num_threads(threads)
    items = [Item(level, Copy(fp, device)) for level, fp in footprints.items()]
    for item in items:
        item.bytes = item.fn.bytes
    rounds, per_round = (1, 1) if smoke else (5, 8)
    time_round_robin(items, device, rounds, per_round)
    return {i.name: {"footprint_bytes": i.bytes, "bytes_per_s": i.bytes / summary(i.samples)["median_s"],
                     **summary(i.samples)} for i in items}


# -- the whole run -----------------------------------------------------------------------
def variants_for(device: torch.device, backends: list[str] | None, history_dtypes: list[str]) -> list[Variant]:
    candidates = ["triton", "cuda", "foreach"] if device.type == "cuda" else ["cpp", "foreach"]
    names = [b for b in (backends or candidates) if mlbfgs_backend_works(b, device)]
    fused = {"triton", "cuda", "cpp"}
    return [Variant(b, h) for b in names for h in history_dtypes if h == "float32" or b in fused]


def run(device=None, sizes=None, history_sizes=HISTORY_SIZES, threads=None, backends=None,
        history_dtypes=tuple(HISTORY_DTYPES), smoke=False, log=print) -> dict:
    device = device or default_device()
    sizes = default_sizes(device) if sizes is None else sizes
    threads = (THREADS if device.type == "cpu" else (torch.get_num_threads(),)) if threads is None else threads
    threads_before = torch.get_num_threads()
    caches = cache_bytes()
    footprints = level_footprints(caches)
    if smoke:
        footprints = {k: min(v, 1 << 20) for k, v in footprints.items()}
    variants = variants_for(device, backends, list(history_dtypes))
    default = variants[0].backend if variants else None
    result = {"caches": caches, "level_footprints": footprints, "default_backend": default,
              "levels": {}, "rows": [], "sizes": list(sizes), "history_sizes": list(history_sizes),
              "threads": list(threads)}
    try:
        for t in threads:
            result["levels"][str(t)] = measure_levels(device, footprints, t, smoke)
            log(f"copy bandwidth, {t} thread(s): " + ", ".join(
                f"{k} {v['bytes_per_s'] / 1e9:.1f} GB/s" for k, v in result["levels"][str(t)].items()))
            # More threads: the default backend only (the others' thread scaling is torch's).
            chosen = variants if t == threads[0] else [v for v in variants if v.backend == default]
            for m in history_sizes:
                for n in sizes:
                    result["rows"] += run_case(device, n, m, t, chosen, baselines=t == threads[0],
                                               adamw=n == min(sizes), caches=caches, smoke=smoke, log=log,
                                               dram_footprint=footprints["DRAM"])
    finally:
        torch.set_num_threads(threads_before)
    result["targets"] = targets(result)
    return result


# -- the tables ---------------------------------------------------------------------------
def _find(rows, **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _ms(s: float) -> str:
    return f"{s * 1e3:.4g}"


def _spread(r: dict) -> str:
    return f"{_ms(r['median_s'])} [{_ms(r['q1_s'])}, {_ms(r['q3_s'])}]"


def _n(n: int) -> str:
    return f"{n:.0e}".replace("e+0", "e")


def targets(result: dict) -> list[dict]:
    """Issue 19's targets for the default backend (float32 history unless said), each
    with its figure and whether it is met."""
    rows, default = result["rows"], result.get("default_backend")
    if default is None:
        return []
    out = []
    t1 = result["threads"][0]
    sizes = result["sizes"]

    def step(n, m, history="float32", threads=t1, item="step"):
        return _find(rows, n=n, m=m, threads=threads, backend=default, history_dtype=history, item=item)

    for m in result["history_sizes"]:
        for history in ("float32", "bfloat16"):
            tag = f"m={m}, {history} history"
            n0 = min(sizes)
            ours, adamw = step(n0, m, history), _find(rows, n=n0, m=m, threads=t1, contender="adamw-fused")
            if ours and adamw:
                ratio = ours["median_s"] / adamw["median_s"]
                out.append({"target": f"fixed cost: step at N={_n(n0)} <= AdamW(fused=True) ({tag})",
                            "figure": f"{ratio:.2f}x AdamW's time ({_ms(ours['median_s'])} vs {_ms(adamw['median_s'])} ms)",
                            "met": ratio <= 1.0})
            for n, want in ((10**4, 3.0), (10**5, 2.0)):
                ours, torch_ = step(n, m, history), _find(rows, n=n, m=m, threads=t1, contender="torch-lbfgs-two-loop")
                if ours and torch_:
                    speedup = torch_["median_s"] / ours["median_s"]
                    out.append({"target": f"in cache: >= {want:g}x torch's two-loop at N={_n(n)} ({tag})",
                                "figure": f"{speedup:.2f}x", "met": speedup >= want})
            for n in (10**6, 10**7):
                ours = step(n, m, history)
                if ours:
                    # The copy larger than the last-level cache, timed in the case's round-robin.
                    dram = ours.get("dram_copy_bytes_per_s", result["levels"][str(t1)]["DRAM"]["bytes_per_s"])
                    frac = ours["bytes"] / ours["median_s"] / dram
                    out.append({"target": f"out of cache: >= 85% of DRAM copy bandwidth for the floor bytes at N={_n(n)} ({tag})",
                                "figure": f"{100 * frac:.0f}% ({100 * ours['fraction_of_copy']:.0f}% of the copy at the working set's footprint)",
                                "met": frac >= 0.85})
            for n in sizes:
                plain, pair = step(n, m, history), step(n, m, history, item="pair_step")
                if plain and pair:
                    ratio = pair["median_s"] / plain["median_s"]
                    out.append({"target": f"pair step <= 1.3x a plain step at N={_n(n)} ({tag})",
                                "figure": f"{ratio:.2f}x (byte floors: {pair['bytes'] / plain['bytes']:.2f}x)",
                                "met": ratio <= 1.3})
        for n in sizes:
            if n < 10**6:
                continue
            f32, bf16 = step(n, m), step(n, m, "bfloat16")
            if f32 and bf16:
                ratio = f32["median_s"] / bf16["median_s"]
                out.append({"target": f"bfloat16 history >= 1.5x faster than float32 at N={_n(n)} (m={m})",
                            "figure": f"{ratio:.2f}x", "met": ratio >= 1.5})
    return out


def markdown(result: dict, stamp: dict | None = None) -> str:
    rows = result["rows"]
    lines = ["# Roofline", ""]
    if stamp:
        lines += [f"Machine: {stamp.get('cpu')} ({stamp.get('cpu_count')} cores), {stamp.get('gpu') or 'no GPU'}; "
                  f"torch {stamp.get('torch')}; commit {stamp.get('commit', '')[:12]}{' (dirty)' if stamp.get('dirty') else ''}; "
                  f"{stamp.get('date')}.", ""]
    loads = [x for r in rows for x in r["load_average"] if x is not None]
    if loads:
        lines += [f"1-minute load average during the run: {min(loads):.1f} to {max(loads):.1f} "
                  f"(on {os.cpu_count()} cores; a load above the core count means other work shared them).", ""]
    lines += ["Copy bandwidth (bytes read + written per second), measured in this run:", "",
              "| threads | " + " | ".join(f"{k} ({v / 2**20:.3g} MiB footprint)" for k, v in result["level_footprints"].items()) + " |",
              "| --- |" + " --- |" * len(result["level_footprints"])]
    for t, levels in result["levels"].items():
        lines.append(f"| {t} | " + " | ".join(f"{v['bytes_per_s'] / 1e9:.1f} GB/s" for v in levels.values()) + " |")
    lines += ["", f"Caches as the OS reports them: L2 {result['caches']['L2'] / 2**20:.3g} MiB, "
              f"last level {result['caches']['LLC'] / 2**20:.4g} MiB. Each row's `% copy` is its bytes per "
              "second over that of a copy whose footprint is the step's working set, timed in the same "
              "round-robin (`level`: where that footprint falls by the reported sizes); `% DRAM copy`, "
              "where the working set is beyond L2, is over that of the copy larger than the last-level cache, "
              "timed in the same round-robin. Times: median [quartiles] in ms.", ""]
    t1 = result["threads"][0]
    # Whole steps.
    lines += ["## Whole steps", "",
              "| backend | history | m | N | level | step ms | GB/s | % copy | % DRAM copy | pair step ms | pair / plain | torch two-loop ms | torch / ours |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("item") != "step" or "backend" not in r or r["threads"] != t1:
            continue
        pair = _find(rows, n=r["n"], m=r["m"], threads=t1, contender=r["contender"], item="pair_step")
        torch_ = _find(rows, n=r["n"], m=r["m"], threads=t1, contender="torch-lbfgs-two-loop")
        lines.append(
            f"| {r['backend']} | {r['history_dtype']} | {r['m']} | {_n(r['n'])} | {r['level']} | {_spread(r)} | "
            f"{r['bytes_per_s'] / 1e9:.1f} | {100 * r['fraction_of_copy']:.0f} | "
            + (f"{100 * r['bytes_per_s'] / r['dram_copy_bytes_per_s']:.0f} | " if "dram_copy_bytes_per_s" in r else " | ")
            + (f"{_spread(pair)} | {pair['median_s'] / r['median_s']:.2f} | " if pair else "| | ")
            + (f"{_spread(torch_)} | {torch_['median_s'] / r['median_s']:.2f} |" if torch_ else "| |"))
    # Passes.
    lines += ["", "## Passes", "", "`push` is a pair step through the passes (gradient_dots, update, push); "
              "bytes are the pass's floor (docs/design.md, \"Byte budget\").", "",
              "| backend | history | m | N | pass | ms | MB | GB/s | % copy |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("item") not in PASS_NAMES or r["threads"] != t1:
            continue
        rate = f"{r['bytes_per_s'] / 1e9:.1f} | {100 * r['fraction_of_copy']:.0f}" if "bytes_per_s" in r else " | "
        lines.append(f"| {r['backend']} | {r['history_dtype']} | {r['m']} | {_n(r['n'])} | {r['item']} | {_spread(r)} | "
                     f"{r['bytes'] / 1e6:.3g} | {rate} |")
    # Fixed cost.
    lines += ["", "## Fixed cost", "", "| backend | history | m | N | step ms | AdamW(fused=True) ms | step / AdamW |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.get("item") == "step" and "backend" in r and r["n"] == min(result["sizes"]) and r["threads"] == t1:
            adamw = _find(rows, n=r["n"], m=r["m"], threads=t1, contender="adamw-fused")
            if adamw:
                lines.append(f"| {r['backend']} | {r['history_dtype']} | {r['m']} | {_n(r['n'])} | {_spread(r)} | "
                             f"{_spread(adamw)} | {r['median_s'] / adamw['median_s']:.2f} |")
    # Threads.
    if len(result["threads"]) > 1:
        t2 = result["threads"][1]
        lines += ["", f"## {t2} threads against {t1}", "",
                  f"Step speed-up next to the speed-up of the copy at the same footprint (and of the named levels: "
                  + ", ".join(f"{k} {result['levels'][str(t2)][k]['bytes_per_s'] / result['levels'][str(t1)][k]['bytes_per_s']:.2f}x"
                              for k in result["level_footprints"]) + ").", "",
                  "| backend | history | m | N | step ms, 1 | step ms, 2 | speed-up | copy speed-up |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            if r.get("item") != "step" or r["threads"] != t2 or "backend" not in r:
                continue
            one = _find(rows, n=r["n"], m=r["m"], threads=t1, contender=r["contender"], item="step")
            if one:
                lines.append(f"| {r['backend']} | {r['history_dtype']} | {r['m']} | {_n(r['n'])} | {_ms(one['median_s'])} | "
                             f"{_ms(r['median_s'])} | {one['median_s'] / r['median_s']:.2f} | "
                             f"{r['copy_bytes_per_s'] / one['copy_bytes_per_s']:.2f} |")
    if result.get("targets"):
        lines += ["", "## Targets (issue 19), default backend", "", "| target | figure | met |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else 'no'} |" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path, device) -> Path:
    stamp = machine_stamp(device)
    (out / "roofline.json").write_text(json.dumps({"machine": stamp, **result}, indent=1))
    path = out / "roofline.md"
    path.write_text(markdown(result, stamp))
    return path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma-separated N (default 1e3..1e7 on the CPU, 1e8 on CUDA)")
    parser.add_argument("--history-sizes", default=",".join(map(str, HISTORY_SIZES)))
    parser.add_argument("--threads", default=None,
                        help="thread counts (default 1,2 on the CPU); the first is the baseline, the others "
                             "run the default backend only")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every backend that runs here)")
    parser.add_argument("--history-dtypes", default=",".join(HISTORY_DTYPES))
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<machine>)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one call each: checks the plumbing")
    args = parser.parse_args(argv)
    device = default_device()
    sizes = [1000, 5000] if args.smoke else default_sizes(device) if args.sizes is None else [
        int(float(x)) for x in args.sizes.split(",") if x]
    result = run(device, sizes=sizes,
                 history_sizes=[2] if args.smoke else [int(x) for x in args.history_sizes.split(",") if x],
                 threads=None if args.threads is None else [int(x) for x in args.threads.split(",") if x],
                 backends=args.backends.split(",") if args.backends else None,
                 history_dtypes=[x for x in args.history_dtypes.split(",") if x], smoke=args.smoke)
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    path = write(result, out, device)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
