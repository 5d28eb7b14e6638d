"""``MLBFGS(distributed=...)`` on W gloo processes against one process on the same data.

One spawn per world size runs every case on every rank (tests/distributed/dist_cases.py);
the tests below compare what the ranks wrote. Float64 agreement is to rounding:
relative error below 1e-12 (measured up to 8e-15 after 28 steps, the partial sums
of the inner products being added in another order); float32 below 1e-5 (measured
up to 2.4e-6).
"""

import pytest
import torch

from dist_cases import CASES, MODES, dtype_of, run_case, run_ddp, scenario, state_list, worker
from dist_harness import spawn
from problems import ReferenceRun

# W = 3 runs the cases that depend on how the elements are dealt; W = 2 all of them,
# and the extras: GradScaler's inf check, torch.distributed.checkpoint, DDP and FSDP2.
WORLD_CASES = {2: CASES, 3: ("checkpoint", "nan_one_rank")}
EXTRAS_AT = 2
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture(scope="module", params=sorted(WORLD_CASES), ids=lambda w: f"W{w}")
def ranks(request, tmp_path_factory):
    """``(world_size, [results of rank r])``."""
    world_size = request.param
    out = tmp_path_factory.mktemp(f"w{world_size}")
    spawn(worker, world_size, str(out), WORLD_CASES[world_size], world_size == EXTRAS_AT)
    return world_size, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.fixture(scope="module")
def single():
    return {case: run_case(case, None) for case in CASES}


def _cases(world_size):
    return [(m, c) for m in MODES for c in WORLD_CASES[world_size]]


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_parameters_match_one_process(ranks, single):
    world_size, results = ranks
    for mode, case in _cases(world_size):
        expected = single[case]["params"]
        first = results[0][(mode, case)]["params"]
        for r in range(world_size):  # every rank holds the same whole parameters
            for a, b in zip(results[r][(mode, case)]["params"], first):
                assert torch.equal(a, b), (mode, case, r)
        errors = [_relative(a, b) for a, b in zip(first, expected)]
        assert max(errors) < TOLERANCE[dtype_of(case)], (mode, case, errors)


def test_block_counters_match_one_process(ranks, single):
    """Pairs accepted and skipped, steps taken and skipped, block by block: the
    ranks together keep every block (once each under "blockwise")."""
    world_size, results = ranks
    for mode, case in _cases(world_size):
        expected = single[case]["counters"]
        union = {}
        for r in range(world_size):
            for block, counters in results[r][(mode, case)]["counters"].items():
                assert union.setdefault(block, counters) == counters, (mode, case, block)
        assert union == expected, (mode, case)
        if mode == "blockwise":
            assert sum(len(res[(mode, case)]["counters"]) for res in results) == len(expected)
    # The scenario exercises what it claims: the ring wraps, a pair is skipped.
    counters = single["checkpoint"]["counters"].values()
    assert max(c[1] for c in counters) > 3 and sum(c[2] for c in counters) >= 1


def test_nan_on_one_rank_skips_the_step_everywhere(ranks, single):
    world_size, results = ranks
    for mode in MODES:
        for res in results:
            counters = res[(mode, "nan_one_rank")]["counters"]
            assert counters and all(c[3] == 1 for c in counters.values()), mode
    assert all(c[3] == 1 for c in single["nan_one_rank"]["counters"].values())


def test_found_inf_on_one_rank_skips_the_step_everywhere(ranks):
    world_size, results = ranks
    if world_size != EXTRAS_AT:
        pytest.skip(f"runs at W = {EXTRAS_AT}")
    for mode in MODES:
        for res in results:
            counters = res[(mode, "found_inf")]
            assert counters and all(c[3] == 1 and c[0] == 7 for c in counters.values()), mode


def test_state_bytes_per_rank(ranks, single):
    """"sharded": each rank keeps 1/W of the per-element state plus every block's
    Gram matrices and counters; "blockwise": the ranks' shards partition the state."""
    world_size, results = ranks
    whole = single["checkpoint"]["state_bytes"]
    m = 3
    n_blocks = len(single["checkpoint"]["counters"])
    replicated = n_blocks * (3 * m * m * 8 + 4 * 8)
    shards = [res[("sharded", "checkpoint")]["state_bytes"] for res in results]
    assert sum(shards) == whole + (world_size - 1) * replicated
    per_element = whole - replicated
    for b in shards:
        assert b - replicated <= per_element / world_size + (5 + 2 * m) * 8 * 2 * world_size
    blockwise = [res[("blockwise", "checkpoint")]["state_bytes"] for res in results]
    assert sum(blockwise) == whole and max(blockwise) < whole


def test_checkpoint_resumes_bit_exactly_at_the_same_world_size(ranks, single):
    world_size, results = ranks
    for mode in MODES:
        for res in results:
            run = res[(mode, "checkpoint")]
            for a, b in zip(run["resumed_params"], run["params"]):
                assert torch.equal(a, b), mode
            s1, s2 = state_list(run["state_dict"]), state_list(run["resumed_state_dict"])
            assert len(s1) == len(s2) > 0
            for a, b in zip(s1, s2):
                assert a.dtype == b.dtype and torch.equal(a, b), mode
            assert run["state_dict"]["distributed"]["world_size"] == world_size


def test_torch_distributed_checkpoint_resumes_bit_exactly(ranks):
    """Each rank's shard through torch.distributed.checkpoint, loaded into an
    optimizer that has not stepped yet."""
    world_size, results = ranks
    if world_size != EXTRAS_AT:
        pytest.skip(f"runs at W = {EXTRAS_AT}")
    for mode in MODES:
        for res in results:
            run, dcp_run = res[(mode, "checkpoint")], res[(mode, "dcp")]
            for a, b in zip(dcp_run["params"], run["params"]):
                assert torch.equal(a, b), mode
            s1, s2 = state_list(run["state_dict"]), state_list(dcp_run["state_dict"])
            assert len(s1) == len(s2) > 0
            for a, b in zip(s1, s2):
                assert a.dtype == b.dtype and torch.equal(a, b), mode


def test_loading_another_world_size_raises(ranks):
    world_size, results = ranks
    for mode in MODES:
        other, single_process = results[0][(mode, "checkpoint")]["load_errors"]
        assert "rank 0 of 7" in other and "resharding is not supported" in other
        assert "single-process optimizer" in single_process


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_ddp_or_fsdp2_and_sharded_match_one_process(ranks, wrapper):
    """DistributedDataParallel (replicated parameters), or FSDP2's fully_shard (DTensor
    parameters, their local shards stepped in place), on a small MLP."""
    world_size, results = ranks
    if world_size != EXTRAS_AT:
        pytest.skip(f"runs at W = {EXTRAS_AT}")
    expected = run_ddp(None, world_size)
    for res in results:
        for a, b in zip(res[(wrapper, "sharded")], expected):
            assert _relative(a, b) < 1e-12


def test_scenario_damps_pairs():
    """The float64 reference on the same scenario damps some of its pairs."""
    sc = scenario("checkpoint")
    ref = ReferenceRun(sc, [h["blocks"] for h in sc.hyper])
    ref.run()
    assert sum(b.damped_pairs for g in ref.groups for b in g.blocks) > 0
