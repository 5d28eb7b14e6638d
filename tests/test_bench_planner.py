"""The memory plan of the step comparison: batches that fit, skips with a reason,
out-of-memory errors recorded instead of ending the stage, estimates that hold."""

import gc
import weakref
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from bench import planner
from bench.compare import compare_steps
from bench.contenders import contenders, per_param_bytes
from bench.memory import measure_memory
from bench.report import memory_table, plan_over_measured, steps_table
from bench.run import _bytes, _sizes, merge_rows

CPU = torch.device("cpu")
N, M = 2000, 2


def fake(name, held, step):
    return SimpleNamespace(name=name, state_bytes=lambda n, m: held * n, step_bytes=lambda n, m: step * n)


def test_plan_cuts_batches_in_order_and_skips_what_fits_nowhere():
    cs = [fake("a", 50, 10), fake("b", 30, 20), fake("huge", 200, 0), fake("c", 10, 40), fake("d", 5, 5)]
    plan = planner.plan_batches(cs, n=1, m=1, budget=120, shared=20)
    # a + b: 20 + 80 held + 20 transient = 120; c: 20 + 10 + 40; d joins c: 20 + 15 + 40
    assert plan.batches == [["a", "b"], ["c", "d"]]
    assert set(plan.skipped) == {"huge"} and "does not fit" in plan.skipped["huge"]
    for batch in plan.batches:
        chosen = [c for c in cs if c.name in batch]
        assert 20 + sum(c.state_bytes(1, 1) for c in chosen) + max(c.step_bytes(1, 1) for c in chosen) <= 120


def test_budget_is_the_free_memory_less_a_margin():
    free = planner.free_bytes(CPU)
    assert free > 0
    assert 0 <= planner.memory_budget(CPU) < free


def _wrapped(c, built: dict):
    """The contender, noting a weak reference to each optimizer it builds."""
    def build(params, history):
        opt = c.build(params, history)
        built[c.name] = weakref.ref(opt)
        return opt
    return replace(c, build=build)


def test_compare_runs_batches_that_fit_frees_each_and_skips_what_does_not():
    chosen = [c for c in contenders(CPU) if c.name in ("mlbfgs-foreach", "sgd-momentum", "adamw-foreach",
                                                       "reference-fp32")]
    need = {c.name: c.state_bytes(N, M) + c.step_bytes(N, M) for c in chosen}
    largest = max(need, key=need.get)
    budget = planner.shared_bytes(N, M) + need[largest] - 1  # the largest does not fit, each other one does
    built = {}
    alive_at_build = {}

    def watch(c):
        inner = _wrapped(c, built)

        def build(params, history):
            gc.collect()
            alive_at_build[c.name] = sorted(name for name, ref in built.items() if ref() is not None)
            return inner.build(params, history)
        return replace(c, build=build)

    result = compare_steps(CPU, [N], history_sizes=(), default_m=M, smoke=True, log=lambda *a: None,
                           candidates=[watch(c) for c in chosen], memory_budget=budget)
    (case,) = result["cases"]
    assert len(case["batches"]) >= 2 and case["budget_bytes"] == budget
    rows = {r["contender"]: r for r in result["rows"]}
    assert "does not fit" in rows[largest]["skipped"] and "median_s" not in rows[largest]
    for name in set(need) - {largest}:
        assert rows[name]["median_s"] > 0 and rows[name]["batch"] == next(
            i for i, b in enumerate(case["batches"]) if name in b)
    # A batch's optimizers are gone before the next batch builds.
    first, *later = case["batches"]
    for batch in later:
        assert not set(first) & set(alive_at_build[batch[0]])
    assert "skipped: does not fit" in steps_table(result)


class _Flaky:
    """A step that raises on some calls (counted over the object's life)."""

    def __init__(self, fail_on, exc):
        self.calls, self.fail_on, self.exc = 0, fail_on, exc

    def step(self):
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.exc


def _contender(name, build):
    return SimpleNamespace(name=name, kind="first-order", build=build, floor_bytes=per_param_bytes(8),
                           state_bytes=per_param_bytes(8), step_bytes=per_param_bytes(0), mutates_grad=False)


def test_out_of_memory_is_a_skip_alone_and_a_retry_beside_others():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    attempts = {"beside-others": 0}

    def oom_only_beside_others(params, history):
        attempts["beside-others"] += 1
        return _Flaky({2} if attempts["beside-others"] == 1 else set(), oom)  # fails in its first batch only

    def raise_oom(params, history):
        raise oom

    cs = [
        contenders(CPU)[0],  # ours: the reference of time_vs_ours
        _contender("oom-at-build", raise_oom),
        _contender("oom-in-step", lambda p, h: _Flaky({3}, oom)),  # alone too: a fresh object fails again
        _contender("oom-beside-others", oom_only_beside_others),
        _contender("broken", lambda p, h: _Flaky({1}, ValueError("not an allocation failure"))),
        _contender("fine", lambda p, h: _Flaky(set(), None)),
    ]
    logged = []
    result = compare_steps(CPU, [N], history_sizes=(), default_m=M, smoke=True, log=logged.append, candidates=cs)
    rows = {r["contender"]: r for r in result["rows"]}
    assert len(rows) == len(cs)
    assert rows["oom-at-build"]["skipped"].startswith("out of memory: OutOfMemoryError")
    assert rows["oom-in-step"]["skipped"].startswith("out of memory")
    assert rows["oom-beside-others"]["median_s"] >= 0 and attempts["beside-others"] == 2
    assert rows["broken"]["error"] == "failed: ValueError: not an allocation failure"
    assert any("Traceback" in line for line in logged)  # an error's traceback is in the log
    assert rows["fine"]["median_s"] >= 0 and rows["fine"]["time_vs_ours"] > 0
    assert rows[cs[0].name]["time_vs_ours"] == 1.0
    (case,) = result["cases"]
    assert sorted(case["retried_alone"]) == ["oom-at-build", "oom-beside-others", "oom-in-step"]
    table = steps_table(result)
    assert "error: failed: ValueError" in table and "skipped: out of memory" in table


def test_a_case_whose_problem_does_not_fit_is_skipped_whole(monkeypatch):
    import bench.compare

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")

    monkeypatch.setattr(bench.compare, "make_history", no_memory)
    cs = [c for c in contenders(CPU) if c.name == "sgd-momentum"]
    result = compare_steps(CPU, [N], history_sizes=(), default_m=M, smoke=True, log=lambda *a: None, candidates=cs)
    (row,) = result["rows"]
    assert row["skipped"].startswith("the case's problem and history: out of memory")


def test_ours_only_cases_run_ours_only():
    cs = [c for c in contenders(CPU) if c.name in ("mlbfgs-foreach", "sgd-momentum")]
    result = compare_steps(CPU, [N], history_sizes=(), default_m=M, smoke=True, log=lambda *a: None,
                           candidates=cs, ours_only_sizes=[2 * N])
    assert {(r["contender"], r["n"]) for r in result["rows"]} == {
        ("mlbfgs-foreach", N), ("sgd-momentum", N), ("mlbfgs-foreach", 2 * N)}
    assert [c["ours_only"] for c in result["cases"]] == [False, True]


def test_memory_estimates_bound_what_every_contender_holds_and_allocates():
    """The plan is safe (estimate >= measured) without being far off (< 3x), at each
    contender's own estimate: held bytes beyond the shared history, the larger transient."""
    result = measure_memory(CPU, [4000], m=4, log=lambda *a: None)
    assert len(result["rows"]) == len(contenders(CPU))
    for r in result["rows"]:
        ratio = plan_over_measured(r)
        assert 1.0 <= ratio < 3.0, (r["contender"], ratio, r["own_state_bytes"], r["build_transient_bytes"],
                                    r["peak_bytes"])
    assert "plan / measured" in memory_table(result)


def test_memory_stage_skips_what_does_not_fit():
    cs = [c for c in contenders(CPU) if c.name in ("mlbfgs-foreach", "sgd-momentum")]
    budget = planner.shared_bytes(N, M) + cs[1].state_bytes(N, M) + cs[1].step_bytes(N, M)
    result = measure_memory(CPU, [N], m=M, log=lambda *a: None, candidates=cs, memory_budget=budget)
    rows = {r["contender"]: r for r in result["rows"]}
    assert "does not fit" in rows["mlbfgs-foreach"]["skipped"] and rows["sgd-momentum"]["peak_bytes"] >= 0
    table = memory_table(result)
    assert "skipped" in table and "does not fit" in table


def test_size_and_byte_arguments():
    assert _sizes("1e5, 3e8") == [10**5, 3 * 10**8] and _sizes("") == []
    assert _bytes("60G") == 60 * 10**9 and _bytes("2GiB") == 2 << 30 and _bytes("1e6") == 10**6


def test_merge_keeps_rows_not_measured_again():
    machine = {"slug": "gpu"}
    old = {"machine": machine, "rows": [{"contender": "a", "n": 1, "m": 2, "median_s": 1.0},
                                        {"contender": "a", "n": 5, "m": 2, "median_s": 2.0}],
           "cases": [{"n": 1, "m": 2}, {"n": 5, "m": 2}]}
    new = {"machine": machine, "rows": [{"contender": "a", "n": 5, "m": 2, "median_s": 3.0}], "cases": [{"n": 5, "m": 2}]}
    merged = merge_rows(old, new)
    assert sorted((r["n"], r["median_s"]) for r in merged["rows"]) == [(1, 1.0), (5, 3.0)]
    assert len(merged["cases"]) == 2
    with pytest.raises(SystemExit, match="not this machine"):
        merge_rows({**old, "machine": {"slug": "other"}}, new)


# -- GPU only ---------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_contenders_and_budget():
    names = [c.name for c in contenders(torch.device("cuda"))]
    assert names[0] == "mlbfgs-triton"
    assert {"mlbfgs-triton-graph", "mlbfgs-triton-released", "mlbfgs-triton-bf16-history"} <= set(names)
    free, total = torch.cuda.mem_get_info()
    assert 0 < planner.memory_budget(torch.device("cuda")) < free <= total


@needs_cuda
def test_graph_replayed_step_matches_the_eager_step():
    """The same steady state (same seed): three eager steps (the graph's warm-up) and then
    five more give the parameters that five replays give."""
    from bench.problem import make_history, make_problem

    device = torch.device("cuda")
    by_name = {c.name: c for c in contenders(device)}
    problem, history = make_problem(100_003, device), make_history(100_003, 4, device)
    torch.manual_seed(0)
    eager_params = problem.fresh_params()
    eager = by_name["mlbfgs-triton"].build(eager_params, history)
    torch.manual_seed(0)
    graph_params = problem.fresh_params()
    replayed = by_name["mlbfgs-triton-graph"].build(graph_params, history)
    for _ in range(3):
        eager.step()
    for _ in range(5):
        eager.step()
        replayed.step()
    torch.cuda.synchronize()
    for p, q in zip(eager_params, graph_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, q) for p, q in zip(problem.params, eager_params))  # the steps moved them


@needs_cuda
def test_compare_on_cuda_runs_batches_and_an_ours_only_case():
    device = torch.device("cuda")
    n = 200_000
    cs = [c for c in contenders(device) if c.name in ("mlbfgs-triton", "mlbfgs-triton-graph", "sgd-fused")]
    budget = planner.shared_bytes(n, M) + max(c.state_bytes(n, M) + c.step_bytes(n, M) for c in cs) + 1
    result = compare_steps(device, [n], history_sizes=(), default_m=M, smoke=True, log=lambda *a: None,
                           candidates=cs, memory_budget=budget, ours_only_sizes=[2 * n])
    assert len(result["cases"][0]["batches"]) >= 2
    assert all("median_s" in r for r in result["rows"]), [r for r in result["rows"] if "median_s" not in r]
    assert {r["contender"] for r in result["rows"] if r["n"] == 2 * n} == {"mlbfgs-triton", "mlbfgs-triton-graph"}


def test_run_writes_the_results_and_then_fails_on_a_row_with_an_error(tmp_path, monkeypatch):
    import json

    import bench.compare
    from bench import run

    def fake_compare(device, sizes, checkpoint=None, **kwargs):
        rows = [{"contender": "ours", "kind": "ours", "n": sizes[0], "m": 10, "median_s": 1e-3, "min_s": 1e-3,
                 "max_s": 1e-3, "time_vs_ours": 1.0, "fraction_of_copy_bandwidth": 0.5},
                {"contender": "broken", "kind": "first-order", "n": sizes[0], "m": 10, "error": "failed: E: x"}]
        result = {"bandwidth": {"bytes_per_s": 1e9}, "ours": "ours", "rows": rows, "cases": []}
        checkpoint(result)
        return result

    monkeypatch.setattr(bench.compare, "compare_steps", fake_compare)
    with pytest.raises(SystemExit, match="broken N=1e\\+03 m=10: failed: E: x"):
        run.main(["--only", "compare", "--sizes", "1e3", "--out", str(tmp_path)])
    assert len(json.loads((tmp_path / "step_compare.json").read_text())["rows"]) == 2
    assert "| broken | error: failed: E: x |" in (tmp_path / "RESULTS.md").read_text()
