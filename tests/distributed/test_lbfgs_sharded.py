"""``LBFGS(distributed="sharded")`` (docs/design.md, "Distributed"): each rank keeps the
history, direction and previous gradient of its slice. On gloo with 2 and 3 processes on
the CPU it equals one process (float64, relative difference below 1e-10 over 30
iterations with pair pushes and a wrapped ring, several parameters and groups), each rank
holds 1/W of the history, and each rank's checkpoint round-trips; on one rank it equals
no ``distributed`` to the bit on every backend."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dist_harness import spawn
from mlbfgs_fused import LBFGS
from mlbfgs_fused.distributed import load_sharded_state_dict, sharded_state_dict

HISTORY = 4  # 30 iterations wrap the ring several times
STEPS = 3
MAX_ITER = 10


def _problem(seed: int = 0):
    """A small two-layer regression: several parameters in two groups, float64."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randn(24, 2, generator=g, dtype=torch.float64)
    shapes = [(6, 5), (6,), (2, 6), (2,)]
    values = [0.5 * torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return X, y, values


def _closure(opt, params, X, y):
    def closure():
        opt.zero_grad()
        W1, b1, W2, b2 = params
        out = torch.tanh(X @ W1.T + b1) @ W2.T + b2
        loss = ((out - y) ** 2).mean() + 1e-3 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    return closure


def _run(values, X, y, steps=STEPS, line_search="strong_wolfe", lr_second=0.5, **kwargs):
    params = [torch.nn.Parameter(v.clone()) for v in values]
    opt = LBFGS(
        [{"params": params[:3]}, {"params": params[3:], "lr": lr_second}],
        history_size=HISTORY, max_iter=MAX_ITER, line_search_fn=line_search,
        tolerance_grad=1e-14, tolerance_change=1e-16, **kwargs,
    )

    closure = _closure(opt, params, X, y)
    losses = [float(opt.step(closure).detach()) for _ in range(steps)]
    state = opt.state[params[0]]
    counts = (state["n_iter"], state["func_evals"], int(state["pair_count"])) if steps else None
    return opt, params, losses, counts


def _history_numel(opt) -> int:
    return sum(a.history_s.numel() + a.history_y.numel() for a in opt._arenas)


def _sharded_worker(rank, world_size, out_dir, cases):
    X, y, values = _problem()
    for backend, line_search in cases:
        opt, params, losses, counts = _run(values, X, y, line_search=line_search, backend=backend,
                                           distributed="sharded")
        result = {"params": [p.detach().clone() for p in params], "losses": losses, "counts": counts,
                  "history": _history_numel(opt)}
        torch.save(result, os.path.join(out_dir, f"{backend}-{line_search}-{rank}.pt"))
    dist.barrier()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# (world size, line search): the second group (2 elements) leaves the third rank an empty slice.
CASES = {2: "strong_wolfe", 3: None}


@pytest.mark.parametrize("world_size", sorted(CASES))
def test_sharded_equals_one_process(tmp_path, world_size):
    """cpp and foreach, in one launch of the ranks each."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    line_search = CASES[world_size]
    cases = [(backend, line_search) for backend in ("cpp", "foreach")]
    spawn(_sharded_worker, world_size, str(tmp_path), cases)
    X, y, values = _problem()
    for backend, _ in cases:
        opt, params, losses, counts = _run(values, X, y, line_search=line_search, backend=backend)
        assert counts[0] == STEPS * MAX_ITER and counts[2] > HISTORY  # every iteration ran; the ring wrapped
        whole = _history_numel(opt)
        results = [torch.load(tmp_path / f"{backend}-{line_search}-{r}.pt") for r in range(world_size)]
        for res in results:
            assert res["counts"] == counts
            assert res["losses"] == pytest.approx(losses, rel=1e-10)
            for p, q in zip(res["params"], results[0]["params"]):
                assert torch.equal(p, q)  # every rank holds the same full parameters
            worst = max(_relative(p, q.detach()) for p, q in zip(res["params"], params))
            assert worst < 1e-10, (backend, worst)
            # Each rank holds its slice of the history: ceil(N / W) columns of each arena's ring.
            slices = sum(-(-a.numel // world_size) for a in opt._arenas)
            assert res["history"] <= 2 * HISTORY * slices
            print(f"{backend} W={world_size}: relative difference {worst:.2e}, history {res['history']} of {whole}")
        assert sum(res["history"] for res in results) == whole


def test_sharded_triton_tiny(tmp_path):
    """The Triton plan (through the interpreter on the CPU) on two ranks, one step."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("triton")
    spawn(_tiny_triton_worker, 2, str(tmp_path))
    X, y, values = _problem()
    _, params, losses, counts = _run(values, X, y, steps=1, backend="triton", max_eval=4)
    for r in range(2):
        res = torch.load(tmp_path / f"{r}.pt")
        assert res["counts"] == counts
        assert max(_relative(p, q.detach()) for p, q in zip(res["params"], params)) < 1e-10


def _tiny_triton_worker(rank, world_size, out_dir):
    X, y, values = _problem()
    _, params, losses, counts = _run(values, X, y, steps=1, backend="triton", max_eval=4, distributed="sharded")
    torch.save({"params": [p.detach() for p in params], "counts": counts}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()


def _checkpoint_worker(rank, world_size, out_dir, backend):
    """Two steps, a checkpoint (state_dict and DCP), two more steps; against a fresh
    optimizer loaded from each and stepped twice."""
    import torch.distributed.checkpoint as dcp

    X, y, values = _problem(1)
    opt, params, _, _ = _run(values, X, y, steps=2, backend=backend, distributed="sharded")
    saved = [p.detach().clone() for p in params]
    plain = opt.state_dict()
    torch.save(plain, os.path.join(out_dir, f"plain{rank}.pt"))
    dcp.save({"optim": sharded_state_dict(opt)}, checkpoint_id=os.path.join(out_dir, "dcp"))
    ends = []
    for how in ("original", "state_dict", "dcp"):
        fresh, fresh_params, _, _ = _run(saved, X, y, steps=0, backend=backend, distributed="sharded")
        if how == "original":
            fresh, fresh_params = opt, params
        elif how == "state_dict":
            fresh.load_state_dict(torch.load(os.path.join(out_dir, f"plain{rank}.pt")))
        else:
            state = {"optim": sharded_state_dict(fresh)}
            dcp.load(state, checkpoint_id=os.path.join(out_dir, "dcp"))
            load_sharded_state_dict(fresh, state["optim"])
        _continue(fresh, fresh_params, X, y)
        ends.append([p.detach().clone() for p in fresh_params])
    torch.save({"ends": ends, "moved": any(not torch.equal(a, b) for a, b in zip(ends[0], saved)),
                "keys": sorted(plain["state"])}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()


def _continue(opt, params, X, y):
    closure = _closure(opt, params, X, y)
    for _ in range(2):
        opt.step(closure)


@pytest.mark.parametrize("backend", ["cpp", "foreach"])
def test_checkpoint_per_rank_round_trip(tmp_path, backend):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    spawn(_checkpoint_worker, 2, str(tmp_path), backend)
    for r in range(2):
        res = torch.load(tmp_path / f"{r}.pt")
        assert res["moved"]
        original, from_state_dict, from_dcp = res["ends"]
        for a, b, c in zip(original, from_state_dict, from_dcp):
            assert torch.equal(a, b) and torch.equal(a, c)
    saved = [torch.load(tmp_path / f"plain{r}.pt") for r in range(2)]
    assert [s["distributed"]["rank"] for s in saved] == [0, 1]
    # A rank's checkpoint is its shard: another rank refuses it.
    assert saved[0]["state"][0]["history_s"].shape != saved[1]["state"][0].get("history_s", torch.empty(0)).shape \
        or not torch.equal(saved[0]["state"][0]["history_s"], saved[1]["state"][0]["history_s"])


# -- one rank in this process -----------------------------------------------------------


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"LBFGS\(distributed='sharded'\) needs the default process group"):
        LBFGS([torch.nn.Parameter(torch.randn(3))], distributed="sharded")


@pytest.mark.parametrize("mode", ["blockwise", "ring"])
def test_invalid_mode(group, mode):
    with pytest.raises(ValueError, match=f"Invalid distributed value: '{mode}'"):
        LBFGS([torch.nn.Parameter(torch.randn(3))], distributed=mode)


def test_bounds_are_refused_before_anything_changes(group):
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(NotImplementedError, match="does not support bounds"):
        LBFGS([w], distributed="sharded", bounds=(0.0, 1.0))
    opt = LBFGS([w], distributed="sharded")
    with pytest.raises(NotImplementedError, match="does not support bounds"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "bounds": (None, 2.0)})
    assert len(opt.param_groups) == 1


def test_checkpoint_of_another_shard_is_refused(group):
    X, y, values = _problem()
    opt, _, _, _ = _run(values, X, y, steps=1, backend="foreach", distributed="sharded")
    plain, _, _, _ = _run(values, X, y, steps=1, backend="foreach")
    with pytest.raises(ValueError, match="a distributed optimizer loads the shard its own rank saved"):
        opt.load_state_dict(plain.state_dict())
    state = opt.state_dict()
    state["distributed"] = {**state["distributed"], "rank": 1, "world_size": 2}
    with pytest.raises(ValueError, match="rank 1 of 2"):
        opt.load_state_dict(state)


@pytest.mark.parametrize("backend", ["foreach", "cpp", "triton"])
def test_one_rank_equals_no_distributed_to_the_bit(group, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    X, y, values = _problem()
    steps = 1 if backend == "triton" else STEPS
    extra = dict(max_eval=4) if backend == "triton" else {}
    plain, p_params, p_losses, p_counts = _run(values, X, y, steps=steps, backend=backend, **extra)
    sharded, s_params, s_losses, s_counts = _run(values, X, y, steps=steps, backend=backend,
                                                 distributed="sharded", **extra)
    assert s_losses == p_losses and s_counts == p_counts
    for p, q in zip(p_params, s_params):
        assert torch.equal(p, q)
    for p in p_params[:1]:
        for key in ("gram", "pair_count"):
            assert torch.equal(plain.state[p][key], sharded.state[s_params[0]][key])
