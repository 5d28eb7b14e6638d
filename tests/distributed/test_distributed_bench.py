"""bench/distributed.py counts what it claims: one all-reduce of ``B (2m + 1)`` float64 on
a plain "sharded" step, ``B (6m + 4)`` in all on a pair step, on the C++ and foreach
backends alike; each rank all-gathers its slice and keeps about half the state."""

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
