"""``distributed=`` in this process, on a process group of one rank: the arguments,
what is not supported yet, and a one-rank run equal to the bit to no ``distributed``
on every backend (a rank that holds part of each block adds a block's partial sums in
the order the fused kernels add them, then completes them: here with nothing)."""

import pytest
import torch
import torch.distributed as dist

from mlbfgs_fused import MLBFGS
from problems import run_scenario, standard_scenario, state_tensors


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        MLBFGS([torch.nn.Parameter(torch.randn(3))], distributed="sharded")


def test_invalid_mode(group):
    with pytest.raises(ValueError, match="Invalid distributed value: 'ring'"):
        MLBFGS([torch.nn.Parameter(torch.randn(3))], distributed="ring")


def test_capturable_is_not_supported_yet(group):
    with pytest.raises(NotImplementedError, match="distributed='sharded'.*capturable=True"):
        MLBFGS([torch.nn.Parameter(torch.randn(3))], distributed="sharded", capturable=True)


@pytest.mark.parametrize("backend", ["foreach", "cpp", "triton"])
def test_dtensor_parameters(group, backend):
    """Sharded on dim 0 (as fully_shard makes them): stepped on their local shards,
    equal to the bit to plain tensors; otherwise refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    values = [torch.randn(4, 3), torch.randn(5)]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    sharded = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [Shard(0)])) for v in values]
    opts = [MLBFGS(plain, history_size=2, update_period=2, blocks="tensor", backend=backend),
            MLBFGS(sharded, history_size=2, update_period=2, blocks="tensor", backend=backend,
                   distributed="sharded")]
    for t in range(9 if backend != "triton" else 6):
        for p, q in zip(plain, sharded):
            p.grad = p.detach() * 0.5 + 0.1 * t
            q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
        for opt in opts:
            opt.step()
    for p, q in zip(plain, sharded):
        assert torch.equal(p.detach(), q.full_tensor())
    with pytest.raises(NotImplementedError, match="distributed='sharded' only"):
        MLBFGS(sharded, distributed="blockwise")
    with pytest.raises(NotImplementedError, match="sharded on dim 0"):
        MLBFGS([torch.nn.Parameter(distribute_tensor(values[0], mesh, [Replicate()]))], distributed="sharded")


ONE_RANK = [(b, m) for b in ("foreach", "cpp", "triton") for m in ("sharded", "blockwise")]


@pytest.mark.parametrize("backend, mode", ONE_RANK)
def test_one_rank_is_the_single_process_optimizer(group, backend, mode):
    sc = standard_scenario("tensor", steps=20 if backend != "triton" else 9, update_period=2 if backend == "triton" else 4)
    sc.nan_steps = (7,)
    plain = run_scenario(sc, torch.float32, backend=backend)
    one_rank = run_scenario(sc, torch.float32, backend=backend, distributed=mode)
    assert max(c for g in one_rank[0]._arenas.values() for c in g.arenas[0].counters["pair_count"].tolist()) > 2
    for a, b in zip([p for g in plain[1] for p in g], [p for g in one_rank[1] for p in g]):
        assert torch.equal(a, b)
    # A rank's state holds its elements flat; here it owns them all.
    s1, s2 = state_tensors(plain[0]), state_tensors(one_rank[0])
    assert len(s1) == len(s2) > 0
    for a, b in zip(s1, s2):
        assert a.dtype == b.dtype and torch.equal(a.reshape(-1), b.reshape(-1))


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_memory_order_parameters(group, backend):
    """A transposed parameter is stepped in memory order, like the plain optimizer
    does; one strided with gaps, or a gradient laid out otherwise, is refused."""
    results = []
    for distributed in (None, "sharded"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(4, 3).t())
        opt = MLBFGS([p], history_size=2, update_period=2, backend=backend, distributed=distributed)
        for _ in range(7):
            p.grad = (p.detach() * 0.5 + 0.1).t().contiguous().t()  # the parameter's strides
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)
    p.grad = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="laid out like its parameter"):
        opt.step()
    q = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    opt = MLBFGS([q], backend=backend, distributed="sharded")
    q.grad = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="dense"):
        opt.step()
