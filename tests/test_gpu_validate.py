"""The GPU validation's plumbing, checked on any machine: its stages, its budget and
its summary (the GPU itself is exercised where there is one); the GPU check's selection,
time plan, few files and merge (bench/gpu_check.py, bench/check_tests.py). The parity
cases the check selects are tests/test_parity.py's."""

import json
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from bench import check_tests, gpu_check, gpu_validate, planner
from bench.machine import REPO_DIR


def test_env_stage_and_summary(tmp_path):
    rc = gpu_validate.main(["--allow-cpu", "--stages", "env,sanitizer", "--out", str(tmp_path), "--budget", "60"])
    assert rc == 0
    summary = json.loads((tmp_path / "validation" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]][:1] == ["env"]
    env = json.loads((tmp_path / "validation" / "env.json").read_text())
    assert env["machine"]["torch"] == torch.__version__
    assert "| env | passed |" in (tmp_path / "validation" / "SUMMARY.md").read_text()


def test_a_spent_budget_skips_stages_instead_of_starting_them(tmp_path):
    rc = gpu_validate.main(["--allow-cpu", "--stages", "tests", "--out", str(tmp_path), "--budget", "10"])
    assert rc == 0
    (record,) = json.loads((tmp_path / "validation" / "summary.json").read_text())["stages"]
    assert record["status"] == "skipped" and record["detail"] == "time budget spent"


def test_junit_counts_tell_skipped_from_run(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="4"/></testsuites>')
    assert gpu_validate.junit_counts(xml) == dict(tests=5, failures=1, errors=0, skipped=4, ran=1)
    assert gpu_validate.junit_counts(tmp_path / "missing.xml") is None


def test_junit_outcomes_by_node_id(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3">'
        '<testcase classname="tests.test_x" name="test_a[f32-[[0, 2], [1]]]" time="1.5"/>'
        '<testcase classname="tests.test_x.TestY" name="test_b" time="0.1"><failure message="assert 1 == 2&#10;more"/>'
        '</testcase><testcase classname="tests.test_x" name="test_c"><skipped message="needs a CUDA GPU"/></testcase>'
        '</testsuite></testsuites>')
    assert gpu_validate.junit_outcomes(xml) == {
        "tests/test_x.py::test_a[f32-[[0, 2], [1]]]": {"outcome": "passed", "seconds": 1.5},
        "tests/test_x.py::TestY::test_b": {"outcome": "failed", "seconds": 0.1, "message": "assert 1 == 2"},
        "tests/test_x.py::test_c": {"outcome": "skipped", "seconds": 0.0, "message": "needs a CUDA GPU"},
    }


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal happens only where torch sees no accelerator")
def test_refuses_to_run_without_a_gpu_unless_asked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_validate.main(["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--allow-cpu" in capsys.readouterr().err


def test_calls_into_separate_folders_merge_into_one(tmp_path, capsys):
    """A time-limited GPU machine takes several calls, each into a fresh folder; --merge gathers
    them: every stage's latest record, every call's command, every file."""
    first, second, collected = tmp_path / "first", tmp_path / "second", tmp_path / "collected"
    assert gpu_validate.main(["--allow-cpu", "--stages", "env,sanitizer", "--out", str(first), "--budget", "60"]) == 0
    assert gpu_validate.main(["--allow-cpu", "--stages", "tests", "--out", str(second), "--budget", "10"]) == 0
    (second / "validation" / "tests.log").write_text("a log of the second call\n")
    assert gpu_validate.main(["--merge", str(first), "--out", str(collected)]) == 0
    assert gpu_validate.main(["--merge", str(second), "--out", str(collected)]) == 0
    summary = json.loads((collected / "validation" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["env", "sanitizer", "tests"]
    assert [r["status"] for r in summary["stages"]][2] == "skipped"
    assert len(summary["runs"]) == 2 and "--stages tests" in summary["runs"][1]["command"]
    assert (collected / "validation" / "env.json").exists()
    assert (collected / "validation" / "tests.log").read_text() == "a log of the second call\n"
    text = (collected / "validation" / "SUMMARY.md").read_text()
    assert text.count("- `python -m bench.gpu_validate") == 2 and "| env | passed |" in text
    # Running a stage again replaces its record, in place.
    third = tmp_path / "third"
    assert gpu_validate.main(["--allow-cpu", "--stages", "env", "--out", str(third), "--budget", "60"]) == 0
    assert gpu_validate.main(["--merge", str(third), "--out", str(collected)]) == 0
    summary = json.loads((collected / "validation" / "summary.json").read_text())
    assert [r["stage"] for r in summary["stages"]] == ["env", "sanitizer", "tests"] and len(summary["runs"]) == 3


def test_merge_refuses_a_folder_that_is_not_a_validation_output(tmp_path):
    with pytest.raises(SystemExit, match="no validation/ folder"):
        gpu_validate.main(["--merge", str(tmp_path), "--out", str(tmp_path / "collected")])


def test_merge_keeps_the_compare_rows_of_both_calls(tmp_path, monkeypatch):
    """A compare stage split over two calls: the rows of both land in one table."""
    from bench import report

    monkeypatch.setattr(report, "make_report", lambda folder: folder / "RESULTS.md")  # rows only here
    machine = {"slug": "gpu-x"}

    def call(folder, n, ms):
        (folder / "validation").mkdir(parents=True)
        (folder / "validation" / "summary.json").write_text(json.dumps({"runs": [], "stages": []}))
        rows = [{"contender": "ours", "n": n, "m": m, "median_s": 1.0} for m in ms]
        (folder / "step_compare.json").write_text(json.dumps({"machine": machine, "rows": rows}))

    call(tmp_path / "a", 100, [5, 10])
    call(tmp_path / "b", 1000, [10])
    out = tmp_path / "collected"
    for name in ("a", "b"):
        gpu_validate.merge_folder(tmp_path / name, out)
    rows = json.loads((out / "step_compare.json").read_text())["rows"]
    assert sorted((r["n"], r["m"]) for r in rows) == [(100, 5), (100, 10), (1000, 10)]


# -- the GPU check: its selection ------------------------------------------------------
class _Item:
    """What bench/check_tests.py reads of a pytest item."""

    def __init__(self, nodeid, cuda=False, slow=False):
        self.nodeid, self.cuda, self.slow = nodeid, cuda, slow

    def get_closest_marker(self, name):
        return object() if (name == "cuda" and self.cuda) or (name == "slow" and self.slow) else None

    def iter_markers(self, name=None):
        return iter(())


def test_the_selections_split_the_tests_without_overlap():
    gpu_parity = next(c.nodeid for c in check_tests.PARITY if c.backend == "cuda")
    items = ([_Item("tests/test_triton_kernels.py::test_slow", slow=True), _Item("tests/test_lbfgs.py::test_plain"),
              _Item("tests/test_native.py::test_plain"),
              _Item("tests/test_lbfgs.py::test_on_the_gpu", cuda=True), _Item(gpu_parity, cuda=True)]
             + [_Item(nodeid, cuda=True) for nodeid in check_tests.GRAPH + check_tests.LATER]
             + [_Item(nodeid) for nodeid in reversed(check_tests.PARITY_IDS) if nodeid != gpu_parity])
    chosen = {mode: [i.nodeid for i in check_tests.select(mode, items)] for mode in ("cuda", "parity", "rest")}
    assert sorted(sum(chosen.values(), [])) == sorted(i.nodeid for i in items)  # each test once
    assert chosen["parity"] == list(check_tests.PARITY_IDS)  # in the list's order
    assert set(check_tests.GRAPH) <= set(chosen["cuda"]) and "tests/test_lbfgs.py::test_on_the_gpu" in chosen["cuda"]
    assert chosen["rest"] == [*check_tests.LATER, "tests/test_native.py::test_plain", "tests/test_lbfgs.py::test_plain",
                              "tests/test_triton_kernels.py::test_slow"]


def test_parity_covers_each_backend_kernel_dtype_and_history_dtype():
    for backend, pairs in check_tests.REQUIRED.items():
        cases = [c for c in check_tests.PARITY if c.backend == backend]
        assert {(c.dtype, c.history) for c in cases} >= set(pairs), backend
        assert {k for c in cases for k in c.kernels} == set(check_tests.KERNELS), backend
    assert len(set(check_tests.PARITY_IDS)) == len(check_tests.PARITY_IDS)


def test_every_selected_test_exists():
    """Collected as on a machine with the CUDA C++ kernels: no id of the list is stale."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", *check_tests.parity_files(), "-q", "--collect-only", "-p", "no:cacheprovider",
         "-p", "bench.check_tests", "--check-select=parity", "--check-pretend-cuda", "--check-report=/dev/stdout"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
    )
    report = json.loads(result.stdout[: result.stdout.index("\n}") + 2])
    assert report["missing"] == [] and report["selected"] == list(check_tests.PARITY_IDS), result.stdout[-2000:]


# -- the GPU check: its time plan ------------------------------------------------------
def test_the_check_fits_eight_minutes_by_the_plan():
    plan = gpu_check.time_plan()
    required = gpu_check.REQUIRED_STAGES
    # The call: start, the budget, a stage stopped at the budget's end, the last files.
    assert gpu_check.LAUNCH_S + gpu_check.CHECK_BUDGET + sum(gpu_validate.STOP_WAITS) + gpu_check.EXPORT_S \
        <= gpu_check.LIMIT_S == 480
    # Stages 1-3, the build (and its look at the extension) included, get their whole caps
    # even when each one before used its own.
    assert "build" in required
    assert sum(plan[s]["cap"] for s in required) + gpu_validate.EXTENSION_CHECK_S \
        <= gpu_check.CHECK_BUDGET - gpu_validate.RESERVE
    for stage, p in plan.items():
        assert p["estimate"] is None or p["estimate"] <= p["cap"], (stage, p)
    # As estimated, the stages of 4 start too, with at least a minute for the rest of the suite.
    assert sum(plan[s]["estimate"] for s in required + ("lbfgs", "train")) + 60 <= gpu_check.CHECK_BUDGET
    # The planner's share: every case of the speed stage runs on an H100 in full.
    for n, m, chosen in gpu_check.speed_cases():
        assert len(chosen) == (3 if n == gpu_check.GRAPH_SIZE else 8), (n, [c.name for c in chosen])
        built = planner.plan_batches(chosen, n, m, gpu_check.PLAN_MEMORY_BUDGET, planner.shared_bytes(n, m))
        assert not built.skipped, built.skipped


def test_the_time_plan_counts_every_build_and_timed_step():
    from bench.contenders import planned_contenders

    cs = [c for c in planned_contenders("cuda") if c.name in ("mlbfgs-triton", "adamw-fused")]
    n, m, bandwidth = 10**8, 10, 1e12
    shared = planner.shared_bytes(n, m)
    one = planner.compare_seconds([(n, m, cs)], bandwidth, 10**13, repeats=30, warmup=2)
    expected = planner.CASE_S + planner.PASSES * shared / bandwidth + sum(
        planner.BUILD_S + planner.PASSES * c.state_bytes(n, m) / bandwidth
        + 32 * (c.step_slowdown * c.floor_bytes(n, m) / bandwidth + c.step_overhead_s) for c in cs)
    assert one == pytest.approx(expected)
    # Room for one contender at a time: two batches, the same work.
    tight = shared + max(c.state_bytes(n, m) + c.step_bytes(n, m) for c in cs) + 1
    assert len(planner.plan_batches(cs, n, m, tight, shared).batches) == 2
    assert planner.compare_seconds([(n, m, cs)], bandwidth, tight, repeats=30, warmup=2) == pytest.approx(one)
    # No room at all: nothing is built or timed.
    alone = planner.compare_seconds([(n, m, cs)], bandwidth, shared, repeats=30, warmup=2)
    assert alone == pytest.approx(planner.CASE_S + planner.PASSES * shared / bandwidth)
    # The memory stage builds each once and steps it twice.
    assert planner.memory_seconds([(n, m, cs)], bandwidth) < one


# -- the GPU check: what it leaves and how it comes back -------------------------------
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the GPU machine's caller gets back


def _fake_speed_results(work):
    machine = {"slug": "gpu-x"}
    rows = [{"contender": "mlbfgs-triton", "kind": "ours", "n": 10**6, "m": 10, "median_s": 2e-3,
             "time_vs_ours": 1.0, "fraction_of_copy_bandwidth": 0.5},
            {"contender": "authors-style", "kind": "mL-BFGS peer", "n": 10**6, "m": 10, "error": "failed: E: x"}]
    work.mkdir(parents=True)
    (work / "step_compare.json").write_text(json.dumps({
        "machine": machine, "bandwidth": {"bytes_per_s": 3e12}, "ours": "mlbfgs-triton", "rows": rows,
        "cases": [{"n": 10**6, "m": 10, "unavailable": ["mlbfgs-cuda"]}]}))


def test_a_dry_check_leaves_a_few_files_that_merge_into_the_results(tmp_path, monkeypatch):
    out, work, results = tmp_path / "gpu", tmp_path / "work", tmp_path / "results"
    _fake_speed_results(work)  # as a speed stage before would have left them
    rc = gpu_validate.main(["--check", "--dry", "--out", str(out), "--work", str(work), "--stages", "env,build",
                            "--build", "never"])
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gpu_check.OUT_FILES) and len(files) <= 7
    assert all(NAME.match(name) and (out / name).is_file() and (out / name).stat().st_size < 16 << 20 for name in files)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["stage"], r["status"]) for r in summary["stages"]] == [("env", "passed"), ("build", "skipped")]
    assert summary["runs"][0]["finished"] and summary["check"]["dry"] and summary["env"]["machine"]["torch"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"validation/env.json", "validation/stage_env.json", "validation/stage_build.json",
            "step_compare.json"} <= names
    text = (out / "SUMMARY.md").read_text()
    assert "| mlbfgs-triton | 2 (1.00x, 50%) |" in text and "| authors-style | ERROR |" in text
    assert "Not running here: N=1e6: mlbfgs-cuda" in text and "| build | skipped |" in text
    assert json.loads((out / "speed.json").read_text())["compare"]["ours"] == "mlbfgs-triton"
    # Back on the development machine.
    from bench import report

    monkeypatch.setattr(report, "make_report", lambda folder: folder / "RESULTS.md")
    assert gpu_validate.main(["--merge", str(out), "--out", str(results)]) == 0
    merged = json.loads((results / "validation" / "summary.json").read_text())
    assert [r["stage"] for r in merged["stages"]] == ["env", "build"] and len(merged["runs"]) == 1
    for name in ("validation/CHECK.md", "validation/correctness.json", "validation/env.json", "step_compare.json"):
        assert (results / name).exists(), name
    assert len(json.loads((results / "step_compare.json").read_text())["rows"]) == 2


def test_a_cut_off_stage_leaves_its_partial_answers(tmp_path, monkeypatch):
    """A test stage past its cap is interrupted and still reports what ran; while it ran,
    the files in --out said so, and a copy of them taken then merges as cut off."""
    import argparse
    import os
    import shutil

    test_file = tmp_path / "test_sleepy.py"
    test_file.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_slow():\n    time.sleep(60)\n")
    out, work, snapshot = tmp_path / "gpu", tmp_path / "work", tmp_path / "snapshot"
    out.mkdir()
    monkeypatch.setattr(gpu_validate, "TICK_S", 0.5)
    monkeypatch.setattr(gpu_validate, "MIN_START", 1)
    export = gpu_check.Export(out, work, argparse.Namespace(argv=["--check"], budget=60.0, dry=False),
                              torch.device("cpu"))

    def tick(runner, final=False):
        export(runner, final)
        if runner.running and runner.running.get("seconds") and not snapshot.exists():
            shutil.copytree(out, snapshot)

    # A cap that a loaded machine's pytest start-up fits in, well short of test_slow's sleep.
    runner = gpu_validate.Runner(work, 60, {"rest-tests": 15}, dict(os.environ), on_tick=tick)
    rec = gpu_validate.stage_tests(runner, "rest-tests", [], files=[str(test_file)])
    assert rec["status"] == "timeout" and rec["tests"]["ran"] >= 1 and rec["tests"]["failures"] == 0
    then = json.loads((snapshot / "summary.json").read_text())
    assert [(r["stage"], r["status"]) for r in then["stages"]] == [("rest-tests", "running")]
    monkeypatch.setattr(gpu_check, "RESULTS_DIR", tmp_path / "results")
    merged = gpu_check.merge_check(snapshot)  # into RESULTS_DIR/<slug>
    (stage,) = json.loads((merged / "validation" / "summary.json").read_text())["stages"]
    assert stage["status"] == "cut off" and (merged / "validation" / "rest_tests.log").exists()


def test_the_build_compiles_for_the_gpu_found_and_fails_without_its_kernels(tmp_path, monkeypatch):
    import os

    calls = []

    def run(self, stage, cmd, log_name, cap_key=None, env=None, interrupt=False):
        calls.append((cmd, env))
        return self.record(stage, "passed", rc=0, seconds=1.0)

    monkeypatch.setattr(gpu_validate.Runner, "run", run)
    monkeypatch.setattr(gpu_validate, "_extension_is_fresh", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    states = iter([{"load_error": None, "cuda_kernels": False}, {"load_error": None, "cuda_kernels": True},
                   {"load_error": None, "cuda_kernels": False}])
    monkeypatch.setattr(gpu_validate, "extension_state", lambda env: next(states))
    runner = gpu_validate.Runner(tmp_path, 60, gpu_validate.CAPS, dict(os.environ))
    gpu_validate.stage_build(runner, torch.device("cuda"))  # fresh, but without CUDA kernels: built
    (cmd, env), = calls
    assert cmd[-6:] == ["install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["MAX_JOBS"] == str(os.cpu_count())
    assert runner.records[-1]["status"] == "passed" and "9.0" in runner.records[-1]["detail"]
    gpu_validate.stage_build(runner, torch.device("cuda"), mode="always")  # the compiler failed
    assert runner.records[-1]["status"] == "failed" and "without its CUDA kernels" in runner.records[-1]["detail"]
    on_disk = json.loads((tmp_path / "validation" / "stage_build.json").read_text())
    assert on_disk["status"] == "failed"
