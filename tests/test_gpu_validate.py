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
