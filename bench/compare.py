"""Whole-step comparison: every contender in one process on the same parameters and gradients.

For each N (and, at the largest N, each history size m) the contenders of
:mod:`bench.contenders` are built on fresh copies of one random problem, in
steady state, and their steps are timed round-robin (warm-up first, then one
step of each contender per round, median over rounds), so that load from
elsewhere on a shared machine falls on all of them alike. An ours-only case
(``ours_only_sizes``, m = ``default_m``) runs only our contenders: at N = 3e8 it
measures our kernels past 2^31 history elements.

The contenders of a case run in the batches of :mod:`bench.planner` (timed
round-robin within a batch, memory released between batches); one that does not
fit alone, or runs out of memory alone, gets a row with ``skipped`` (the reason)
and no time; one that runs out of memory beside others is retried alone. Any other
failure gets a row with ``error`` and the stage goes on (``bench.run`` exits with
an error at the end). Rows carry the time, the floor bytes of the contender's
algorithm, the fraction of the copy bandwidth measured in this run, and the ratio
of the time to ours.
"""

from __future__ import annotations

import traceback

import torch

from . import planner
from .contenders import Contender, contenders
from .problem import make_history, make_problem
from .timing import copy_bandwidth, load_average, time_interleaved

QUASI_NEWTON_KINDS = ("ours", "mL-BFGS peer", "L-BFGS peer", "out-of-place reference")


def repeats_for(n: int, device: torch.device) -> int:
    if device.type == "cuda":
        return 30
    return 30 if n <= 10**5 else 15 if n <= 10**6 else 7


def compare_cases(sizes, history_sizes, default_m, ours_only_sizes=()) -> list[tuple[int, int, bool]]:
    """(N, m, ours only): every N at ``default_m``, the other m at the largest N, then the
    ours-only sizes (last: the largest allocations, and the kernels' largest indices)."""
    cases = [(n, default_m, False) for n in sizes]
    cases += [(max(sizes), m, False) for m in history_sizes if m != default_m] if sizes else []
    return cases + [(n, default_m, True) for n in ours_only_sizes]


def choose(candidates: list[Contender], m: int, default_m: int, ours_only: bool) -> list[Contender]:
    if ours_only:
        return [c for c in candidates if c.kind == "ours"]
    return [c for c in candidates if m == default_m or c.kind in QUASI_NEWTON_KINDS]  # first order: no m


def select(candidates: list[Contender], n: int, only=None, at=None) -> tuple[list[Contender], list[str]]:
    """The contenders named for size ``n`` (``at[n]``, else ``only``; all when neither names
    any), in the candidates' order, and the names asked for that no candidate has (a backend
    or option that does not run on this machine)."""
    names = (at or {}).get(n, only)
    if names is None:
        return list(candidates), []
    known = {c.name for c in candidates}
    return [c for c in candidates if c.name in names], [name for name in names if name not in known]


def compare_steps(device, sizes, history_sizes=(5, 10, 20), default_m=10, smoke=False, log=print,
                  ours_only_sizes=(), candidates: list[Contender] | None = None,
                  memory_budget: int | None = None, checkpoint=None, only=None, at=None) -> dict:
    """Time every case of :func:`compare_cases`. ``memory_budget`` caps the planner's budget
    (bytes); ``checkpoint`` gets the result so far after each case (a partial file survives
    a run cut short). ``only`` (names) and ``at`` (N -> names) pick contenders (:func:`select`);
    a case records the names asked for that do not run here as ``unavailable``."""
    bandwidth = copy_bandwidth(device, nbytes=1 << 20 if smoke else None, repeats=2 if smoke else 10)
    candidates = contenders(device) if candidates is None else candidates
    reference = candidates[0].name  # ours: Triton when it runs, else the C++ or foreach backend
    result = {"bandwidth": bandwidth, "ours": reference, "rows": [], "cases": []}
    for n, m, ours_only in compare_cases(sizes, history_sizes, default_m, ours_only_sizes):
        picked, unavailable = select(candidates, n, only, at)
        names = {c.name for c in picked}
        chosen = [c for c in choose(candidates, m, default_m, ours_only) if c.name in names]
        case = _Case(device, n, m, chosen, bandwidth, memory_budget, smoke, log)
        rows = case.run()
        if unavailable:
            case.record["unavailable"] = unavailable
            log(f"  N={n:.0e} m={m:2d}: not running here: {unavailable}")
        ours = next((r for r in rows if r["contender"] == reference and "median_s" in r), None)
        for row in rows:
            if "median_s" in row:
                row["time_vs_ours"] = row["median_s"] / ours["median_s"] if ours else None
        result["rows"] += rows
        result["cases"].append({"n": n, "m": m, "ours_only": ours_only, **case.record})
        if checkpoint is not None:
            checkpoint(result)
    return result


class _Case:
    """One (N, m): plan the batches, build and time each batch, free it, record the rows."""

    def __init__(self, device, n, m, chosen, bandwidth, budget, smoke, log):
        self.device, self.n, self.m, self.log = device, n, m, log
        self.by_name = {c.name: c for c in chosen}
        self.bandwidth, self.smoke = bandwidth, smoke
        self.rows: list[dict] = []
        planner.release_memory(device)
        available = planner.memory_budget(device)
        self.plan = planner.plan_batches(chosen, n, m, available if budget is None else min(budget, available),
                                         planner.shared_bytes(n, m))
        self.record = {"budget_bytes": self.plan.budget, "shared_bytes": self.plan.shared,
                       "batches": [list(b) for b in self.plan.batches], "retried_alone": []}
        log(f"  plan N={n:.0e} m={m:2d}: budget {planner.gb(self.plan.budget)} GB, shared "
            f"{planner.gb(self.plan.shared)} GB, batches {self.plan.batches}"
            + (f", skipped {sorted(self.plan.skipped)}" if self.plan.skipped else ""))

    def _row(self, c: Contender, **fields) -> dict:
        return {"contender": c.name, "kind": c.kind, "n": self.n, "m": self.m, **fields}

    def skip(self, name: str, reason: str, key: str = "skipped") -> None:
        c = self.by_name[name]
        self.rows.append(self._row(c, **{key: reason}, floor_bytes=c.floor_bytes(self.n, self.m),
                                   estimated_bytes=c.state_bytes(self.n, self.m) + c.step_bytes(self.n, self.m)))
        self.log(f"  step N={self.n:.0e} m={self.m:2d} {name:26s} {key}: {reason}")

    def failed(self, name: str, exc: BaseException, alone: bool, retry: list[str]) -> None:
        """An out-of-memory error beside others: retry alone; alone: a skip; else an error."""
        if planner.is_out_of_memory(exc) and not alone:
            retry.append(name)
            self.log(f"  step N={self.n:.0e} m={self.m:2d} {name:26s} out of memory in a batch: retried alone")
            return
        if not planner.is_out_of_memory(exc):
            self.log(traceback.format_exc().rstrip())
        self.skip(name, planner.failure_reason(exc), planner.row_key(exc))

    def run(self) -> list[dict]:
        for name, reason in self.plan.skipped.items():
            self.skip(name, reason)
        if not self.plan.batches:
            return self.rows
        try:
            self.problem = make_problem(self.n, self.device)
            self.history = make_history(self.n, self.m, self.device)
        except Exception as exc:  # noqa: BLE001 -- recorded in every row of the case
            reason = planner.failure_reason(exc)
            key = planner.row_key(exc)
        else:
            reason = None
        if reason is not None:
            self.problem = self.history = None
            planner.release_memory(self.device)
            for batch in self.plan.batches:
                for name in batch:
                    self.skip(name, f"the case's problem and history: {reason}", key)
            return self.rows
        queue = [(i, batch) for i, batch in enumerate(self.plan.batches)]
        while queue:
            index, batch = queue.pop(0)
            retry: list[str] = []
            self._run_batch(index, batch, retry)
            planner.release_memory(self.device)
            self.record["retried_alone"] += retry
            queue += [(f"{index}-alone", [name]) for name in retry]
        self.problem = self.history = None
        planner.release_memory(self.device)
        return self.rows

    def _run_batch(self, index, batch: list[str], retry: list[str]) -> None:
        n, m, device, problem = self.n, self.m, self.device, self.problem
        alone = len(batch) == 1
        steps, restore = {}, {}
        for name in batch:
            c = self.by_name[name]
            params = None
            try:
                params = problem.fresh_params()
                steps[name] = c.build(params, self.history).step
            except Exception as exc:  # noqa: BLE001 -- recorded, the stage goes on
                self.failed(name, exc, alone, retry)
            if name not in steps:  # the failed build's tensors are garbage now: give them back
                params = None
                planner.release_memory(device)
            elif c.mutates_grad:
                restore[name] = lambda p=params, prob=problem: prob.restore_grads(p)
        params = None
        load_before = load_average()
        timings = time_interleaved(
            steps, device, repeats=2 if self.smoke else repeats_for(n, device), warmup=1 if self.smoke else 2,
            before_each=restore, catch=(Exception,),
            on_error=lambda name, exc: self.failed(name, exc, alone, retry),
        )
        for name in batch:
            if name not in timings:
                continue
            c, timing = self.by_name[name], timings[name]
            floor = c.floor_bytes(n, m)
            self.rows.append(self._row(
                c, **timing, floor_bytes=floor,
                fraction_of_copy_bandwidth=floor / timing["median_s"] / self.bandwidth["bytes_per_s"],
                copy_bandwidth_bytes_per_s=self.bandwidth["bytes_per_s"],
                load_average=[load_before, load_average()], batch=index,
            ))
            self.log(f"  step N={n:.0e} m={m:2d} {name:26s} {timing['median_s'] * 1e3:10.3f} ms "
                     f"(min {timing['min_s'] * 1e3:.3f})")
