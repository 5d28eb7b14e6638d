"""Every benchmark once at tiny sizes, so the suite cannot rot (``make test`` runs this).

``bench.run --smoke`` runs each stage (the pytest-benchmark microbenchmarks with
``--benchmark-disable``, the step comparison, memory, audit, the roofline and a training
run on digits) and writes plots and RESULTS.md into a temporary folder.
"""

import json

from bench import run


def test_every_benchmark_runs_at_tiny_sizes(tmp_path):
    out = run.main(["--smoke", "--out", str(tmp_path)])
    for name in ("step_compare.json", "memory.json", "audit.json", "roofline.json", "roofline.md", "training.json", "RESULTS.md",
                 "step_time.png", "memory_peak.png", "training_cnn.png", "training_mlp.png"):
        assert (out / name).exists(), name
    compare = json.loads((out / "step_compare.json").read_text())
    names = {r["contender"] for r in compare["rows"]}
    assert {"mlbfgs-foreach", "authors-style", "torch-lbfgs-direction", "adamw-foreach", "sgd-momentum"} <= names
    assert all("median_s" in r for r in compare["rows"])  # nothing skipped or failed at tiny sizes
    ours_only = [r for r in compare["rows"] if r["n"] == run.SMOKE_OURS_ONLY_SIZES[0]]
    assert ours_only and {r["kind"] for r in ours_only} == {"ours"}
    memory = json.loads((out / "memory.json").read_text())
    assert {r["kind"] for r in memory["rows"] if r["n"] == run.SMOKE_OURS_ONLY_SIZES[0]} == {"ours"}
    assert compare["machine"]["torch"] and compare["machine"]["commit"]
    audit = json.loads((out / "audit.json").read_text())
    assert all(row["params_keep_storage"] for row in audit["rows"])
    text = (out / "RESULTS.md").read_text()
    for section in ("## 2. Whole step", "## 3. Memory", "## 4. In-place audit", "## 5. Training runs", "## 6. Roofline"):
        assert section in text
    roofline = json.loads((out / "roofline.json").read_text())
    items = {(r["contender"], r["item"]) for r in roofline["rows"]}
    for item in ("gradient_dots", "two_loop", "update", "push", "step", "pair_step"):
        assert ("foreach", item) in items, item
    assert ("torch-lbfgs-two-loop", "step") in items and ("adamw-fused", "step") in items
    assert set(roofline["levels"]["1"]) == {"L2", "LLC", "DRAM"}
