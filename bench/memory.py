"""Peak memory of an optimizer step, on any device.

:class:`AllocationTracker` is a ``TorchDispatchMode`` that sees every aten op
run while it is active, notes each output whose storage is new (shares no
storage with an input and is not already known) and watches, through weak
references, when such storages die. Storages that existed before (parameters,
state) are noted when an op reads them, so that freeing one during the step
lowers the count, as it lowers ``torch.cuda.memory_allocated``. ``peak_bytes``
is then the largest net growth of live tensor bytes since the mode was
entered: on CUDA the same quantity as ``max_memory_allocated() - before``, up
to the caching allocator's rounding and any scratch an aten kernel allocates
internally (invisible to a dispatch mode).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Allocation:
    op: str
    nbytes: int
    numel: int
    dtype: str


class AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._created: dict[int, tuple[StorageWeakRef, int]] = {}
        self._preexisting: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.allocations: list[Allocation] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        input_keys = set()
        for t in _tensors(tree_leaves((args, kwargs))):
            storage = t.untyped_storage()
            key = storage._cdata
            input_keys.add(key)
            if key not in self._created and key not in self._preexisting:
                self._preexisting[key] = (StorageWeakRef(storage), storage.nbytes())
        out = func(*args, **kwargs)
        self._sweep()
        for t in _tensors(tree_leaves(out)):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in input_keys or key in self._created or key in self._preexisting:
                continue  # a view, an in-place result or an ``out=`` argument
            nbytes = storage.nbytes()
            self._created[key] = (StorageWeakRef(storage), nbytes)
            self.current_bytes += nbytes
            self.allocations.append(Allocation(str(func.overloadpacket), nbytes, t.numel(), str(t.dtype)))
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self._sweep()
        return result

    def _sweep(self) -> None:
        for table in (self._created, self._preexisting):
            for key in [k for k, (ref, _) in table.items() if ref.expired()]:
                # a pre-existing storage that dies lowers the count like a created one
                _, nbytes = table.pop(key)
                self.current_bytes -= nbytes

    def live_created_bytes(self) -> int:
        """Bytes of storages created while tracking that are still alive."""
        self._sweep()
        return sum(n for ref, n in self._created.values() if not ref.expired())


def _tensors(leaves):
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided and leaf.device.type != "meta":
            yield leaf


def step_peak_memory(step: Callable[[], object], device: torch.device) -> dict:
    """Peak bytes allocated during one call of ``step`` above the memory in use before it.

    Always measured with :class:`AllocationTracker`; on CUDA also with
    ``torch.cuda.max_memory_allocated`` in the same call, to validate the tracker.
    """
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with AllocationTracker() as tracker:
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device) - before
        result["cuda_retained_bytes"] = torch.cuda.memory_allocated(device) - before
    result["tracker_peak_bytes"] = tracker.peak_bytes
    result["tracker_retained_bytes"] = tracker.current_bytes
    result["peak_bytes"] = result.get("cuda_peak_bytes", tracker.peak_bytes)
    result["allocations"] = tracker.allocations
    return result


# -- the memory benchmark ----------------------------------------------------------
def held_tensor_bytes(obj, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages reachable from an optimizer object (its state,
    history lists, scratch buffers), parameters and gradients (``exclude``) aside."""
    excluded = {t.untyped_storage()._cdata for t in exclude}
    seen_objects, storages = set(), {}

    def walk(value):
        if id(value) in seen_objects:
            return
        seen_objects.add(id(value))
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage._cdata not in excluded:
                storages[storage._cdata] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                walk(item)
        elif type(value).__module__.split(".")[0] in ("mlbfgs_fused", "bench", "torch") and hasattr(value, "__dict__"):
            if not isinstance(value, (torch.nn.Module, torch.Generator)):
                walk(vars(value))

    walk(obj)
    return sum(storages.values())


def build_peak_memory(build: Callable[[], object], device: torch.device) -> tuple[object, dict]:
    """Build an optimizer; return it with the bytes it kept and the most it allocated
    on top while building (on CUDA from the allocator's statistics: a build may capture
    a CUDA graph, which no dispatch mode should watch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        opt = build()
        torch.cuda.synchronize(device)
        peak, kept = torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before
    else:
        with AllocationTracker() as tracker:
            opt = build()
        peak, kept = tracker.peak_bytes, tracker.current_bytes
    return opt, {"build_kept_bytes": kept, "build_transient_bytes": peak - kept}


def measure_memory(device: torch.device, sizes, m: int = 10, log=print, ours_only_sizes=(),
                   candidates=None, memory_budget: int | None = None, only=None, at=None) -> dict:
    """Peak transient bytes of one steady-state step of every contender as N grows,
    the persistent optimizer-state bytes per parameter, and the memory plan's estimates
    beside the measured bytes. ``ours_only_sizes`` measure our contenders only; ``only``
    and ``at`` pick contenders as in ``bench.compare.select``. A contender that the plan
    says does not fit, or that runs out of memory, gets a row with ``skipped``; one that
    fails otherwise a row with ``error``."""
    from . import planner
    from .compare import select
    from .contenders import contenders
    from .problem import make_history, make_problem

    candidates = contenders(device) if candidates is None else candidates
    rows, unavailable = [], {}
    for n, ours_only in [(n, False) for n in sizes] + [(n, True) for n in ours_only_sizes]:
        picked, missing = select(candidates, n, only, at)
        if missing:
            unavailable[n] = missing
        chosen = [c for c in picked if c.kind == "ours" or not ours_only]
        if not chosen:
            continue
        planner.release_memory(device)
        budget = planner.memory_budget(device)
        budget = budget if memory_budget is None else min(budget, memory_budget)
        shared = planner.shared_bytes(n, m)
        problem = history = None
        try:
            problem = make_problem(n, device)
            history = make_history(n, m, device)
        except Exception as exc:  # noqa: BLE001 -- recorded in the rows of this N
            case_failure = planner.failure_reason(exc)
        else:
            case_failure = None
        for c in chosen:
            base = {"contender": c.name, "kind": c.kind, "n": n, "m": m}
            planned = {"planned_state_bytes": c.state_bytes(n, m), "planned_step_bytes": c.step_bytes(n, m)}
            if case_failure is not None:
                rows.append({**base, **planned, "skipped": f"the problem and history: {case_failure}"})
                continue
            reason = planner.misfit(c, n, m, budget, shared)
            if reason is not None:
                rows.append({**base, **planned, "skipped": reason})
                log(f"  memory N={n:.0e} {c.name:26s} skipped: {reason}")
                continue
            try:
                rows.append({**base, **planned, **_measure(c, problem, history, device)})
            except Exception as exc:  # noqa: BLE001 -- recorded, the stage goes on
                reason = planner.failure_reason(exc)
                key = planner.row_key(exc)
                if key == "error":
                    log(traceback.format_exc().rstrip())
                rows.append({**base, **planned, key: reason})
                log(f"  memory N={n:.0e} {c.name:26s} {key}: {reason}")
            else:
                log(f"  memory N={n:.0e} {c.name:26s} peak {rows[-1]['peak_bytes'] / n:6.1f} B/param, "
                    f"state {rows[-1]['state_bytes_per_param']:6.1f} B/param")
            planner.release_memory(device)
        problem = history = None
        planner.release_memory(device)
    result = {"m": m, "rows": rows}
    if unavailable:
        result["unavailable"] = {str(n): names for n, names in unavailable.items()}
    return result


def _measure(c, problem, history, device) -> dict:
    n = problem.numel
    params = problem.fresh_params()
    opt, build = build_peak_memory(lambda: c.build(params, history), device)
    opt.step()  # past any first-step allocation
    if c.mutates_grad:
        problem.restore_grads(params)
    measured = step_peak_memory(opt.step, device)
    allocations = measured.pop("allocations")
    large = [a for a in allocations if a.numel >= n // 20]
    tensors = params + [p.grad for p in params]
    return {
        **measured, **build,
        "peak_bytes_per_param": measured["peak_bytes"] / n,
        "state_bytes_per_param": held_tensor_bytes(opt, tensors) / n,
        # What the plan estimates: its own parameters and gradients, not the shared history.
        "own_state_bytes": held_tensor_bytes(opt, tensors + [history.S, history.Y]) + 8 * n,
        "large_allocations": _summarise(large),
    }


def _summarise(allocations: list[Allocation]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for a in allocations:
        entry = out.setdefault(a.op, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += a.nbytes
    return out
