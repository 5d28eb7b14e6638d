"""The GPU validation's plumbing, checked on any machine: its stages, its budget and
its summary (the GPU itself is exercised where there is one)."""

import json

import pytest
import torch

from bench import gpu_validate


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
