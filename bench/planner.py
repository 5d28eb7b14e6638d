"""Memory planning: which contenders of a case run together, and which cannot run at all;
and a time plan: how long a stage takes on a GPU (at the end).

A case (one N and m) holds a shared problem (parameters and gradients) and a shared
history; each contender adds what it holds between steps (``Contender.state_bytes``:
its copy of the parameters and gradients, its state, history and scratch) and, for a
while, what one build or step allocates on top (``Contender.step_bytes``). Estimates,
in bytes, for float32 parameters; ``tests/test_bench_planner.py`` checks them against
the allocation tracker. The contenders of a case run in batches whose sum of held
bytes plus the largest transient, on top of the shared bytes, fits the budget; a
contender that does not fit on its own is skipped with the reason recorded.

The budget is the memory free now (``torch.cuda.mem_get_info`` plus what torch's
caching allocator holds unused; on the CPU ``MemAvailable`` of ``/proc/meminfo``)
less a safety margin, unless given (``bench.run --memory-budget``).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Share of the free memory the planner hands out, and a reserve on top: the CUDA
# context's growth (cuBLAS workspaces, Triton modules, CUDA graph pools), the
# caching allocator's rounding and fragmentation, the rest of the process on a CPU.
FREE_SHARE = 0.9
RESERVE_BYTES = {"cuda": 2 << 30, "cpu": 1 << 30}


def release_memory(device: torch.device) -> None:
    """Give back what the dead objects of a batch held (cycles included), also to the
    CUDA driver, so that the next batch and ``mem_get_info`` see it."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int:
    """Bytes that allocations on ``device`` can still get."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks torch's caching allocator holds but no tensor uses are free to torch.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device) -> int:
    """Bytes the planner may hand out on ``device`` now."""
    return max(0, int(free_bytes(device) * FREE_SHARE) - RESERVE_BYTES.get(device.type, 1 << 30))


def shared_bytes(n: int, m: int) -> int:
    """A case's shared problem (parameters and gradients, float32) and float32 history
    ``S``, ``Y`` (with the curvature vector made on the way)."""
    return 8 * n + (8 * m + 4) * n


@dataclass
class Plan:
    """Batches of contender names in run order, and the skipped ones with their reasons."""

    batches: list[list[str]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    budget: int = 0
    shared: int = 0


def plan_batches(contenders: Sequence, n: int, m: int, budget: int, shared: int) -> Plan:
    """Cut ``contenders`` (in order) into batches that fit ``budget`` bytes with the case's
    ``shared`` bytes; skip, with the reason, each one that does not fit alone."""
    plan = Plan(budget=budget, shared=shared)
    held = transient = 0
    current: list[str] = []
    for c in contenders:
        c_held, c_step = c.state_bytes(n, m), c.step_bytes(n, m)
        reason = misfit(c, n, m, budget, shared)
        if reason is not None:
            plan.skipped[c.name] = reason
            continue
        if current and shared + held + c_held + max(transient, c_step) > budget:
            plan.batches.append(current)
            current, held, transient = [], 0, 0
        current.append(c.name)
        held += c_held
        transient = max(transient, c_step)
    if current:
        plan.batches.append(current)
    return plan


def misfit(c, n: int, m: int, budget: int, shared: int) -> str | None:
    """Why contender ``c`` cannot run even alone within ``budget`` bytes, or None."""
    needs = c.state_bytes(n, m) + c.step_bytes(n, m)
    if shared + needs <= budget:
        return None
    return f"does not fit: needs {gb(needs)} GB on top of the case's shared {gb(shared)} GB, budget {gb(budget)} GB"


def row_key(exc: BaseException) -> str:
    """The key of a failed contender's row: ``skipped`` when memory ran out, else ``error``."""
    return "skipped" if is_out_of_memory(exc) else "error"


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g}"


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: CUDA's, or the CPU allocator's (a plain RuntimeError)."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def failure_reason(exc: BaseException) -> str:
    """One line for a JSON row: the exception's type and first line (no traceback: a
    stored exception would keep the failed step's frames and tensors alive)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = "out of memory" if is_out_of_memory(exc) else "failed"
    return f"{kind}: {type(exc).__name__}: {first}"[:300]


# -- time plan -----------------------------------------------------------------------
# How long a compare or memory stage takes on a GPU, to size a run to a time limit
# (``bench.gpu_validate --check``; tests/test_gpu_validate.py holds its speed stage to its
# cap with these). A step takes :func:`step_seconds`; a process starts in
# PROCESS_S (Python, torch, the CUDA context, ``contenders()`` trying every backend with
# Triton's kernels already compiled by the stages before); each case makes its problem
# and history (CASE_S, plus a few passes over the shared bytes); each contender builds in
# BUILD_S plus a few passes over what it holds. Guesses on the slow side; a GPU run's
# stage times correct them.
PROCESS_S = 25.0
CASE_S = 1.0
BUILD_S = 0.5
PASSES = 3  # writes of a case's or a build's bytes: random draws, copies, Gram matrices


def step_seconds(c, n: int, m: int, bandwidth: float) -> float:
    """Contender ``c``'s guessed step time at ``bandwidth`` bytes per second (read plus written)."""
    return c.step_slowdown * c.floor_bytes(n, m) / bandwidth + c.step_overhead_s


def compare_seconds(cases, bandwidth: float, budget: int, repeats: int, warmup: int) -> float:
    """Guessed seconds of ``bench.compare.compare_steps`` over ``cases``, a list of
    ``(n, m, contenders)``, in the batches :func:`plan_batches` makes of ``budget`` bytes;
    without the process start. Every contender of a batch is built, warmed up and timed
    ``repeats`` times."""
    total = 0.0
    for n, m, chosen in cases:
        shared = shared_bytes(n, m)
        plan = plan_batches(chosen, n, m, budget, shared)
        total += CASE_S + PASSES * shared / bandwidth
        by_name = {c.name: c for c in chosen}
        for batch in plan.batches:
            for c in (by_name[name] for name in batch):
                total += BUILD_S + PASSES * c.state_bytes(n, m) / bandwidth
                total += (warmup + repeats) * step_seconds(c, n, m, bandwidth)
    return total


def memory_seconds(cases, bandwidth: float) -> float:
    """Guessed seconds of ``bench.memory.measure_memory`` over ``cases``, a list of
    ``(n, m, contenders)``: per contender a build and two steps (one watched by the
    allocation tracker); without the process start."""
    total = 0.0
    for n, m, chosen in cases:
        total += CASE_S + PASSES * shared_bytes(n, m) / bandwidth
        for c in chosen:
            total += BUILD_S + PASSES * c.state_bytes(n, m) / bandwidth + 2 * step_seconds(c, n, m, bandwidth)
    return total
