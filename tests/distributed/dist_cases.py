"""What each rank runs in the distributed tests, and the same runs in one process.

Every case is a scenario of tests/problems.py stepped by ``MLBFGS(distributed=mode)``
on every rank, on one backend; the ranks write what the tests compare (full
parameters, per-block counters by global block, the bytes of their shard of the
state, the history they keep) to ``out_dir``. The Triton backend runs through the
interpreter on the CPU, a launch at a time: its cases are shorter (``TINY``).
"""

from __future__ import annotations

import io
import os

import torch
import torch.nn as nn

from problems import build_params, make_optimizer, set_grads, standard_scenario

MODES = ("sharded", "blockwise")
# "checkpoint" runs uninterrupted too: it is the plain agreement case as well.
CASES = ("checkpoint", "nan_one_rank", "released", "float32")
# The backends every case runs on; Triton (through the interpreter, a launch at a time)
# runs TINY_CASES under "sharded" (its "blockwise" runs on one rank:
# test_distributed_single_rank.py).
BACKENDS = ("foreach", "cpp")
TINY = "triton"
TINY_CASES = ("checkpoint", "released")
TINY_MODES = ("sharded",)
NAN_STEP = 10
STEPS, SAVE_AT = 30, 18
TINY_STEPS, TINY_SAVE_AT = 8, 5


def scenario(case: str, single_process: bool = False, backend: str = "foreach"):
    """Two groups; group 0 in blocks listed out of order (its second parameter, whose
    gradient is absent for the first steps, alone: that block skips its first pair),
    group 1 cut into blocks of at most 6 elements (blocks split parameters); a history
    of 3 wraps; damping acts. On ``TINY``: 8 steps, a pair every 2 steps, a history
    of 2 (which wraps)."""
    if backend == TINY:
        sc = standard_scenario([[0, 2], [1]], steps=TINY_STEPS, seed=3, history_size=2, update_period=2)
    else:
        sc = standard_scenario([[0, 2], [1]], steps=STEPS, seed=3)
    sc.hyper[1]["blocks"] = 6
    if case == "released":
        for hyper in sc.hyper:
            hyper["variant"] = "released"
    if case == "nan_one_rank" and single_process:
        sc.nan_steps = (NAN_STEP,)  # what one rank's NaN must amount to
    return sc


def dtype_of(case: str) -> torch.dtype:
    return torch.float32 if case == "float32" else torch.float64


def save_at(backend: str) -> int:
    return TINY_SAVE_AT if backend == TINY else SAVE_AT


def cases_of(backend: str, cases: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(c for c in cases if c in TINY_CASES) if backend == TINY else cases


def modes_of(backend: str) -> tuple[str, ...]:
    return TINY_MODES if backend == TINY else MODES


def history_numels(opt) -> dict:
    """``(group, global block) -> elements of the block's history rows`` this
    optimizer (or rank) keeps, with the history size."""
    out = {}
    for gi, built in sorted(opt._arenas.items()):
        arena = built.arenas[0]
        ids = getattr(arena.layout, "blocks", range(arena.layout.num_blocks))
        for b, gb in enumerate(ids):
            s, y = arena.block_state(b)["history_s"], arena.block_state(b)["history_y"]
            out[(gi, gb)] = (s.numel(), y.numel(), arena.m)
    return out


def block_counters(opt) -> dict:
    """``(group, global block) -> (step, pair_count, skipped_pairs, skipped_steps)``
    for the blocks this optimizer (or rank) keeps."""
    out = {}
    for gi, built in sorted(opt._arenas.items()):
        arenas = built.arenas
        arena = arenas[0]
        ids = getattr(arena.layout, "blocks", range(arena.layout.num_blocks))
        c = arena.counters
        for b, gb in enumerate(ids):
            out[(gi, gb)] = tuple(
                int(c[k][b]) for k in ("step", "pair_count", "skipped_pairs", "skipped_steps")
            )
    return out


def state_list(state_dict: dict) -> list[torch.Tensor]:
    out = []
    for pid in sorted(state_dict["state"]):
        entry = state_dict["state"][pid]
        for key in sorted(entry):
            if key == "blocks":
                out += [block[k] for block in entry[key] for k in sorted(block)]
            else:
                out.append(entry[key])
    return out


def state_bytes(state_dict: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state_list(state_dict))


def flat_groups(groups) -> list[torch.Tensor]:
    return [torch.cat([p.detach().reshape(-1).double() for p in g]) for g in groups]


def _poison(opt, rank: int) -> None:
    """A NaN in one gradient entry this rank owns (the other ranks see finite ones)."""
    for _, built in sorted(opt._arenas.items()):
        arenas = built.arenas
        arena = arenas[0]
        for i, p in enumerate(arena.params):
            if p.grad is not None and arena.local_grad(i).numel():
                arena.local_grad(i)[0] = float("nan")
                return
    raise AssertionError(f"rank {rank} owns no gradient entry")


def _copy_into(groups, values) -> None:
    with torch.no_grad():
        for g, saved in zip(groups, values):
            for p, v in zip(g, saved):
                p.copy_(v)


def run_case(case: str, mode: str | None, rank: int = 0, world_size: int = 1, backend: str = "foreach") -> dict:
    """One case on ``backend``, distributed (``mode``) or in one process (``mode=None``)."""
    sc = scenario(case, single_process=mode is None, backend=backend)
    groups = build_params(sc, dtype_of(case))
    kwargs = {"backend": backend} if mode is None else {"backend": backend, "distributed": mode}
    opt = make_optimizer(sc, groups, **kwargs)
    result = {}
    for step in range(sc.steps):
        if case == "checkpoint" and step == save_at(backend):
            saved_params = [[p.detach().clone() for p in g] for g in groups]
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
        set_grads(sc, groups, step)
        if mode is not None and case == "nan_one_rank" and step == NAN_STEP and rank == world_size - 1:
            _poison(opt, rank)
        opt.step()
    result["params"] = flat_groups(groups)
    result["counters"] = block_counters(opt)
    result["state_dict"] = opt.state_dict()
    result["state_bytes"] = state_bytes(result["state_dict"])
    result["history"] = history_numels(opt)
    if case == "checkpoint":
        # Resume from the shard this rank saved, on fresh parameters and a fresh optimizer.
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        groups2 = build_params(sc, dtype_of(case))
        _copy_into(groups2, saved_params)
        opt2 = make_optimizer(sc, groups2, **kwargs)
        opt2.load_state_dict(checkpoint)
        for step in range(save_at(backend), sc.steps):
            set_grads(sc, groups2, step)
            opt2.step()
        result["resumed_params"] = flat_groups(groups2)
        result["resumed_state_dict"] = opt2.state_dict()
        if mode is not None:
            result["load_errors"] = _load_errors(sc, checkpoint, kwargs)
    return result


def run_dcp(mode: str, rank: int, world_size: int, path: str, backend: str = "foreach") -> dict:
    """The checkpoint case through torch.distributed.checkpoint: saved at SAVE_AT,
    loaded into a fresh optimizer that has not stepped, run to the end."""
    import torch.distributed.checkpoint as dcp

    from mlbfgs_fused.distributed import load_sharded_state_dict, sharded_state_dict

    sc = scenario("checkpoint", backend=backend)
    groups = build_params(sc, torch.float64)
    opt = make_optimizer(sc, groups, backend=backend, distributed=mode)
    for step in range(save_at(backend)):
        set_grads(sc, groups, step)
        opt.step()
    dcp.save({"optim": sharded_state_dict(opt)}, checkpoint_id=path)
    groups2 = build_params(sc, torch.float64)
    _copy_into(groups2, groups)
    opt2 = make_optimizer(sc, groups2, backend=backend, distributed=mode)
    state = {"optim": sharded_state_dict(opt2)}
    dcp.load(state, checkpoint_id=path)
    load_sharded_state_dict(opt2, state["optim"])
    for step in range(save_at(backend), sc.steps):
        set_grads(sc, groups2, step)
        opt2.step()
    return {"params": flat_groups(groups2), "state_dict": opt2.state_dict()}


def _load_errors(sc, checkpoint: dict, kwargs: dict) -> list[str]:
    """The messages of loading this shard as another world size's, and a
    single-process checkpoint, into a distributed optimizer."""
    messages = []
    other = dict(checkpoint, distributed={**checkpoint["distributed"], "world_size": 7})
    single = {k: v for k, v in checkpoint.items() if k != "distributed"}
    for bad in (other, single):
        opt = make_optimizer(sc, build_params(sc, torch.float64), **kwargs)
        try:
            opt.load_state_dict(bad)
        except ValueError as e:
            messages.append(str(e))
        else:
            messages.append("")
    return messages


def run_found_inf(mode: str, rank: int, world_size: int, backend: str = "foreach") -> dict:
    """``GradScaler``'s inf check fires on the last rank only, at one step."""
    sc = standard_scenario("tensor", steps=8, seed=5)
    groups = build_params(sc, torch.float32)
    opt = make_optimizer(sc, groups, backend=backend, distributed=mode)
    for step in range(sc.steps):
        set_grads(sc, groups, step)
        if step == 3:
            opt.grad_scale = None  # as after scaler.unscale_
            opt.found_inf = torch.tensor(float(rank == world_size - 1))
        opt.step()
        opt.__dict__.pop("grad_scale", None)
        opt.__dict__.pop("found_inf", None)
    return block_counters(opt)


def run_scarce(backend: str, mode: str | None, steps: int = 11) -> torch.Tensor:
    """Three elements in two tensors: at W = 3 "sharded" leaves a rank without a block's
    elements (it still takes part in every collective), "blockwise" a rank without blocks."""
    from mlbfgs_fused import MLBFGS

    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (2, 1)]
    kwargs = {} if mode is None else {"distributed": mode}
    opt = MLBFGS(params, lr=0.05, history_size=2, update_period=2, blocks="tensor", backend=backend, **kwargs)
    for t in range(steps):
        for p in params:
            p.grad = p.detach() * torch.linspace(0.5, 1.5, p.numel(), dtype=torch.float64) + 0.1 * t
        opt.step()
    return torch.cat([p.detach() for p in params])


# -- DDP ----------------------------------------------------------------------------
DDP_STEPS, DDP_BATCH = 16, 4


def ddp_problem(world_size: int):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(DDP_STEPS, world_size * DDP_BATCH, 6, generator=gen, dtype=torch.float64)
    y = torch.randn(DDP_STEPS, world_size * DDP_BATCH, 3, generator=gen, dtype=torch.float64)
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, x, y


def _ddp_opt(model, backend: str, **kwargs):
    from mlbfgs_fused import MLBFGS

    return MLBFGS(model.parameters(), lr=0.05, history_size=3, update_period=3,
                  ema_decay=(0.8, 0.9), blocks="tensor", backend=backend, **kwargs)


def run_ddp(rank: int | None, world_size: int, backend: str = "foreach") -> list[torch.Tensor]:
    """DDP (averaged gradients) + ``distributed="sharded"`` when ``rank`` is given,
    else one process on the whole batch."""
    model, x, y = ddp_problem(world_size)
    if rank is None:
        net, opt, rows = model, _ddp_opt(model, backend), slice(None)
    else:
        net = nn.parallel.DistributedDataParallel(model)
        opt = _ddp_opt(model, backend, distributed="sharded")
        rows = slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
    for t in range(DDP_STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(net(x[t, rows]), y[t, rows]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def run_fsdp(rank: int, world_size: int, backend: str = "foreach") -> list[torch.Tensor]:
    """FSDP2 (``fully_shard``: DTensor parameters, reduce-scattered gradients) +
    ``distributed="sharded"``, stepping the local shards; the full parameters after."""
    from torch.distributed.fsdp import fully_shard

    model, x, y = ddp_problem(world_size)
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    opt = _ddp_opt(model, backend, distributed="sharded")
    rows = slice(rank * DDP_BATCH, (rank + 1) * DDP_BATCH)
    for t in range(DDP_STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[t, rows]), y[t, rows]).backward()
        opt.step()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


# -- what a rank runs ---------------------------------------------------------------
def worker(rank: int, world_size: int, out_dir: str, cases: tuple[str, ...], backends: tuple[str, ...],
           extras: bool) -> None:
    """The cases on each backend in both modes (``cases_of``); with ``extras``, GradScaler's
    inf check, DCP, DDP and FSDP2. Results are keyed ``(backend, mode, case)``."""
    results = {}
    for backend in backends:
        for mode in modes_of(backend):
            for case in cases_of(backend, cases):
                results[(backend, mode, case)] = run_case(case, mode, rank, world_size, backend)
    if world_size == 3:
        for backend in (b for b in backends if b != TINY):
            for mode in MODES:
                results[(backend, mode, "scarce")] = run_scarce(backend, mode)
    if extras:  # on the backends that run every case (Triton's checkpoints: torch.save)
        for backend in (b for b in backends if b != TINY):
            for mode in MODES:
                path = os.path.join(out_dir, f"dcp_{backend}_{mode}")
                results[(backend, mode, "dcp")] = run_dcp(mode, rank, world_size, path, backend)
                results[(backend, mode, "found_inf")] = run_found_inf(mode, rank, world_size, backend)
            results[(backend, "ddp", "sharded")] = run_ddp(rank, world_size, backend)
            results[(backend, "fsdp", "sharded")] = run_fsdp(rank, world_size, backend)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
