"""bench/distributed.py counts what it claims: one all-reduce of ``B (2m + 1)`` float64 on
a plain "sharded" step, ``B (6m + 4)`` in all on a pair step, on the C++ and foreach
backends alike; each rank all-gathers its slice and keeps about half the state. LBFGS's
rows at the end."""

import math

import pytest

from bench import distributed as bench


@pytest.fixture(scope="module")
def rows():
    return bench.run(worlds=(2,), backends=("cpp", "foreach"), modes=("sharded",), smoke=True, steps=22)


def test_collectives_per_step(rows):
    B, m = len(bench.SMOKE_SHAPES), bench.HYPER["history_size"]
    numel = sum(math.prod(s) for s in bench.SMOKE_SHAPES)
    pair = {"cpp": [B * (2 * m + 1), 3 * B, 4 * m * B], "foreach": [B * (2 * m + 1), 2 * B, B, 4 * m * B]}
    assert [r["backend"] for r in rows] == ["cpp", "foreach"]
    for r in rows:
        assert r["numel"] == numel
        plain, on_pair = r["plain_step"], r["pair_step"]
        assert plain["each"]["all_reduce"] == [8 * B * (2 * m + 1)], r["backend"]
        assert on_pair["each"]["all_reduce"] == [8 * n for n in pair[r["backend"]]], r["backend"]
        assert sum(on_pair["each"]["all_reduce"]) == 8 * B * (6 * m + 4)
        assert plain["each"]["all_gather"] == [4 * -(-numel // 2)]  # float32, the longest slice
        assert 0.5 < r["state_bytes_max_rank"] / (4 * numel * (5 + 2 * m)) < 0.6


def test_table_says_when_times_measure_contention(rows):
    assert "contention" in bench.format_table(rows, cores=2)
    assert "contention" not in bench.format_table(rows, cores=8)


def test_lbfgs_collectives_per_step():
    """LBFGS sharded at W = 2: one all-reduce per evaluation of ``A (6m + 10) + 2 A W + 1``
    float64 (one arena here), one all-gather of the longest slice per iteration, half the
    history per rank; without ``distributed`` the read vector alone is all-reduced."""
    rows = bench.run_lbfgs(worlds=(2,), backends=("cpp",), smoke=True, steps=3)
    numel = sum(math.prod(s) for s in bench.SMOKE_SHAPES)
    m, iterations = bench.LBFGS_HYPER["history_size"], bench.LBFGS_HYPER["max_iter"]
    replicated, sharded = rows
    assert (replicated["mode"], sharded["mode"]) == ("none", "sharded")
    assert replicated["step"]["each"]["all_reduce"] == [8 * 7] * replicated["evaluations"]
    assert sharded["evaluations"] == iterations
    assert sharded["step"]["each"]["all_reduce"] == [8 * ((6 * m + 10) + 2 * 2 + 1)] * iterations
    assert sharded["step"]["each"]["all_gather"] == [4 * -(-numel // 2)] * iterations
    assert 0.5 < sharded["state_bytes_max_rank"] / replicated["state_bytes_max_rank"] < 0.52
