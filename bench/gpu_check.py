"""The first GPU run: one call of at most 8 minutes, build included, the big questions first.

    make gpu-check                                   # on the GPU machine: into $OUT/gpu
    python -m bench.gpu_validate --check --out DIR   # the same
    python -m bench.gpu_validate --check --dry --out DIR   # anywhere: tiny sizes, tests collected only
    python -m bench.gpu_validate --check --plan      # each stage's cap and estimated seconds
    python -m bench.gpu_validate --merge DIR         # on the development machine: into bench/results/<gpu>/

Stages, in order (bench/README.md, "GPU check"), each with a cap (:data:`CHECK_CAPS`) within
one budget (:data:`CHECK_BUDGET`):

1. ``env``: the machine's stamp; ``build``: this package installed into the machine's own
   Python and torch, offline, its CUDA C++ kernels compiled for the GPU found only.
2. ``cuda-tests``: the tests that need a GPU, CUDA graph capture and replay with pair steps
   among them; ``parity``: each CUDA backend against the float64 reference, every kernel,
   dtype and history dtype at least once (bench/check_tests.py, the one list of both);
   ``sanitizer``: compute-sanitizer memcheck over a few fused steps of each CUDA backend.
3. ``speed``: the whole step at N = 1e6, 1e7, 1e8 (m = 10) of our backends (float32 and
   bfloat16 history) beside torch.optim.LBFGS's two-loop, the authors'-style step, fused
   AdamW and the foreach path, the graph-replayed Triton step at N = 1e5, the copy
   bandwidth of the same run, and each one's memory peak per step
   (``torch.cuda.max_memory_allocated``): bench.run's compare and memory stages.
4. If time remains: ``lbfgs`` (LBFGS's time per iteration), ``train`` (a short training
   run), ``rest-tests`` (the rest of the suite, with the time left).

Everything lands in a work folder (``--work``, default a new temporary folder, the layout
of ``bench.gpu_validate``); after every stage, and every ``TICK_S`` seconds while one runs,
at most six files are (re)written in ``--out`` (what a GPU machine's caller gets back:
:data:`OUT_FILES`), so that a run cut off anywhere still leaves its answers.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shlex
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from . import planner
from .check_tests import GRAPH, PARITY, REQUIRED
from .gpu_validate import CAPS, MIN_START, Runner, junit_outcomes, run_stage
from .machine import RESULTS_DIR, machine_slug, machine_stamp

# -- what runs, for how long ------------------------------------------------------------
LIMIT_S = 480  # the whole call, from `make gpu-check` to its last file
LAUNCH_S = 10  # make and the interpreter's start (torch imported) before the budget's clock starts
EXPORT_S = 2  # the last export after the budget
CHECK_BUDGET = 450  # LAUNCH_S + CHECK_BUDGET + a stopped stage's waits + EXPORT_S <= LIMIT_S
CHECK_STAGES = ("env", "build", "cuda-tests", "parity", "sanitizer", "speed", "lbfgs", "train", "rest-tests")
REQUIRED_STAGES = CHECK_STAGES[:6]  # 1 to 3: each gets its whole cap even when every one before used its own
CHECK_CAPS = {
    **CAPS,
    "env": 15, "build": 140, "cuda-tests": 75, "parity": 55, "sanitizer": 55, "speed": 85,
    "lbfgs": 40, "train": 60, "rest-tests": 600,  # the rest: what is left
}
# Expected seconds on an H100 machine (16 cores): guesses for the stages before the first
# GPU run times them; the speed stage's comes from bench.planner's time plan.
ESTIMATES = {"env": 5, "build": 80, "cuda-tests": 55, "parity": 35, "sanitizer": 35, "lbfgs": 20, "train": 35}
# The build: 6 sources compiled side by side (MAX_JOBS = the cores); the slowest (a CUDA source
# with torch's headers) took 34 s alone on one core of the development machine.
CHECK_SANITIZER_TOOLS = ("memcheck",)

# The speed stage: bench.run's selection (bench/README.md, "GPU check").
SPEED_SIZES = (10**6, 10**7, 10**8)
SPEED_M = 10
SPEED_CONTENDERS = (  # {native}: the CUDA C++ backend ("cuda"), on a machine without a GPU the C++ one
    "mlbfgs-triton", "mlbfgs-triton-bf16-history", "mlbfgs-{native}", "mlbfgs-{native}-bf16-history",
    "mlbfgs-foreach", "authors-style", "torch-lbfgs-direction", "adamw-fused",
)
GRAPH_SIZE = 10**5
GRAPH_CONTENDERS = ("mlbfgs-triton", "mlbfgs-triton-graph", "adamw-fused")
DRY_SIZES, DRY_GRAPH_SIZE = (1000, 2000, 4000), 500
# The time plan's machine: an H100 (a device-to-device copy moved 3.0 TB/s there; 2.5
# keeps a margin) and the planner's budget of its 80 GB.
PLAN_BANDWIDTH = 2.5e12
PLAN_MEMORY_BUDGET = 70 * 10**9

LBFGS_ARGS = [
    "--sizes", "1e5,1e6,1e7", "--histories", "10,100", "--line-search", "none", "--iters", "5", "--repeats", "5",
]
DRY_LBFGS_ARGS = ["--sizes", "1000", "--histories", "3", "--line-search", "none", "--iters", "2", "--repeats", "1"]
TRAIN_ARGS = "--epochs 2 --seeds 1"  # Fashion-MNIST where its files are (MLBFGS_FASHION_MNIST_DIR), else digits
PARALLEL_TESTS = ["-n", "4", "--dist", "loadfile"]  # the rest of the suite, when pytest-xdist is there

# -- what comes back -------------------------------------------------------------------
OUT_FILES = ("summary.json", "SUMMARY.md", "correctness.json", "speed.json", "extra.json", "logs.tar.gz")
GROUPS = {  # stage records in each results file
    "correctness.json": ("build", "cuda-tests", "parity", "sanitizer", "sanitizer-memcheck", "sanitizer-racecheck",
                         "fused-steps"),
    "speed.json": ("speed",),
    "extra.json": ("lbfgs", "bench-train", "rest-tests"),
}
LOG_FILE_LIMIT = 4 << 20  # a longer log goes into the archive as its first and last 1 MiB


def speed_args(device: torch.device, dry: bool = False) -> list[str]:
    """bench.run's options of the speed stage on ``device`` (tiny sizes in a dry run)."""
    native = "cuda" if device.type == "cuda" else "cpp"
    sizes, graph = (DRY_SIZES, DRY_GRAPH_SIZE) if dry else (SPEED_SIZES, GRAPH_SIZE)
    names = ",".join(name.format(native=native) for name in SPEED_CONTENDERS)
    return ["--sizes", ",".join(str(n) for n in (graph, *sizes)), "--m", str(SPEED_M),
            "--history-sizes", str(SPEED_M), "--ours-only-sizes", "", "--contenders", names,
            "--contenders-at", f"{graph}=" + ",".join(GRAPH_CONTENDERS)] + (["--smoke"] if dry else [])


def lbfgs_args(device: torch.device, dry: bool = False) -> list[str]:
    return ["--device", device.type, *(DRY_LBFGS_ARGS if dry else LBFGS_ARGS)]


def parallel_args() -> list[str]:
    return PARALLEL_TESTS if importlib.util.find_spec("xdist") is not None else []


# -- the time plan ---------------------------------------------------------------------
def speed_cases(contenders=None) -> list[tuple[int, int, list]]:
    """The speed stage's cases on a CUDA machine, ``(n, m, contenders)``, from the contenders
    such a machine gives (``bench.contenders.planned_contenders``)."""
    from .contenders import planned_contenders

    candidates = planned_contenders("cuda") if contenders is None else contenders
    main = {name.format(native="cuda") for name in SPEED_CONTENDERS}
    cases = [(GRAPH_SIZE, SPEED_M, [c for c in candidates if c.name in GRAPH_CONTENDERS])]
    return cases + [(n, SPEED_M, [c for c in candidates if c.name in main]) for n in SPEED_SIZES]


def speed_seconds(bandwidth: float = PLAN_BANDWIDTH, budget: int = PLAN_MEMORY_BUDGET) -> float:
    """The speed stage's estimate: one process, bench.compare's and bench.memory's cases."""
    from .compare import repeats_for

    cases = speed_cases()
    compare = sum(planner.compare_seconds([case], bandwidth, budget, repeats_for(case[0], torch.device("cuda")),
                                          warmup=2) for case in cases)
    return planner.PROCESS_S + compare + planner.memory_seconds(cases, bandwidth)


def time_plan() -> dict[str, dict]:
    """Each stage's cap and estimated seconds, in order."""
    estimates = {**ESTIMATES, "speed": speed_seconds()}
    return {stage: {"cap": CHECK_CAPS[stage], "estimate": estimates.get(stage)} for stage in CHECK_STAGES}


def format_plan(plan: dict[str, dict]) -> str:
    lines = [f"GPU check: a budget of {CHECK_BUDGET} s within a {LIMIT_S} s call; stages 1-3 "
             f"({', '.join(REQUIRED_STAGES)}) get their whole caps",
             "| stage | cap s | estimate s |", "|---|---|---|"]
    for stage, p in plan.items():
        estimate = "the time left" if p["estimate"] is None else f"{p['estimate']:.0f}"
        lines.append(f"| {stage} | {p['cap']:.0f} | {estimate} |")
    required = sum(plan[s]["estimate"] for s in REQUIRED_STAGES)
    lines.append(f"stages 1-3: caps {sum(plan[s]['cap'] for s in REQUIRED_STAGES):.0f} s, estimates {required:.0f} s")
    return "\n".join(lines)


# -- running it ------------------------------------------------------------------------
def run_check(args, stages: list[str], caps: dict, device: torch.device, env: dict) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="mlbfgs-gpu-check-"))).resolve()
    if work == out or out in work.parents or work in out.parents:
        raise SystemExit("--work and --out must not hold each other: only a few files go to --out")
    for name in OUT_FILES:  # a folder reused: nothing stale
        (out / name).unlink(missing_ok=True)
        (out / f"{name}.part").unlink(missing_ok=True)
    if device.type != "cuda":
        env = {**env, "TRITON_INTERPRET": "1"}
    export = Export(out, work, args, device)
    runner = Runner(work, args.budget, caps, env, on_tick=export)
    print(f"gpu check: {', '.join(stages)}; budget {args.budget:.0f} s; work {work}; results {out}"
          + (" (dry run)" if args.dry else ""), flush=True)
    for stage in stages:
        if runner.left() < MIN_START:
            runner.record(stage, "skipped", detail="time budget spent")
            continue
        run_stage(runner, stage, device, args)
    export(runner, final=True)
    print("\n" + (out / "SUMMARY.md").read_text(), flush=True)
    return 0 if export.ok(runner) else 1


class Export:
    """Writes :data:`OUT_FILES` into ``out`` from the work folder (each file replaced whole)."""

    def __init__(self, out: Path, work: Path, args, device: torch.device):
        self.out, self.work, self.args = out, work, args
        self.started = time.time()
        self.slug = machine_slug(device)
        self.stamp = machine_stamp(device)

    def ok(self, runner: Runner) -> bool:
        return all(r["status"] in ("passed", "skipped") for r in runner.records)

    def __call__(self, runner: Runner, final: bool = False) -> None:
        stages = list(runner.records) + ([dict(runner.running)] if runner.running else [])
        env_path = runner.logs / "env.json"
        summary = {
            "slug": self.slug,
            "machine": self.stamp,
            "env": json.loads(env_path.read_text()) if env_path.exists() else None,
            "check": {"budget_s": self.args.budget, "limit_s": LIMIT_S, "dry": self.args.dry,
                      "caps": {s: runner.caps[s] for s in CHECK_STAGES if s in runner.caps}, "work": str(self.work)},
            "runs": [{"command": "python -m bench.gpu_validate " + shlex.join(self.args.argv),
                      "budget_s": self.args.budget, "elapsed_s": round(time.time() - self.started, 1),
                      "ok": self.ok(runner), "finished": final}],
            "stages": stages,
        }
        correctness = self.correctness(runner)
        speed = {"stages": self.records(runner, "speed.json"), "compare": _load(self.work / "step_compare.json"),
                 "memory": _load(self.work / "memory.json")}
        extra = {"stages": self.records(runner, "extra.json"), "lbfgs": _load(self.work / "lbfgs.json"),
                 "training": _load(self.work / "training.json")}
        for name, data in (("correctness.json", correctness), ("speed.json", speed), ("extra.json", extra),
                           ("summary.json", summary)):
            _write(self.out / name, json.dumps(data, indent=1, default=str).encode())
        (runner.logs / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        _write(self.out / "SUMMARY.md", summary_md(summary, correctness, speed, extra).encode())
        _write(self.out / "logs.tar.gz", archive(self.work))

    def records(self, runner: Runner, name: str) -> list[dict]:
        wanted = GROUPS[name]
        running = [dict(runner.running)] if runner.running else []
        return [r for r in list(runner.records) + running if r["stage"] in wanted]

    def correctness(self, runner: Runner) -> dict:
        parity = junit_outcomes(runner.logs / "parity.xml")
        cuda = junit_outcomes(runner.logs / "cuda_tests.xml")
        cases = []
        for case in PARITY:
            outcome = parity.get(case.nodeid) or cuda.get(case.nodeid) or {"outcome": "not run"}
            cases.append({"test": case.nodeid, "backend": case.backend, "dtype": case.dtype,
                          "history": case.history, "kernels": list(case.kernels), "what": case.what, **outcome})
        coverage = {}
        for backend, pairs in REQUIRED.items():
            for dtype, history in pairs:
                outcomes = [c["outcome"] for c in cases
                            if (c["backend"], c["dtype"], c["history"]) == (backend, dtype, history)]
                coverage.setdefault(backend, {})[f"{dtype}/{history}"] = _worst(outcomes)
        return {"stages": self.records(runner, "correctness.json"), "parity": cases, "coverage": coverage,
                "graph": [{"test": nodeid, **(cuda.get(nodeid) or {"outcome": "not run"})} for nodeid in GRAPH]}


def _worst(outcomes: list[str]) -> str:
    for outcome in ("failed", "error", "not run", "skipped", "passed"):
        if outcome in outcomes:
            return outcome
    return "no test"


def _load(path: Path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:  # being written
        return None


def _write(path: Path, data: bytes) -> None:
    """Replace ``path`` whole (a run cut off mid-write leaves the previous version)."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def archive(work: Path) -> bytes:
    """The work folder as a .tar.gz (logs longer than LOG_FILE_LIMIT cut to their ends)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if len(data) > LOG_FILE_LIMIT:
                data = data[: 1 << 20] + b"\n[... cut: the first and last 1 MiB kept ...]\n" + data[-(1 << 20):]
            info = tarfile.TarInfo(str(path.relative_to(work)))
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# -- the summary a person reads first --------------------------------------------------
def summary_md(summary: dict, correctness: dict, speed: dict, extra: dict) -> str:
    run = summary["runs"][-1]
    m = summary["machine"]
    env = summary.get("env") or {}
    gpu = (env.get("gpu") or {}).get("name") or m.get("gpu") or "no GPU"
    lines = [f"# GPU check: {gpu}, {m['date']}, commit {m['commit'][:12]}{' (dirty)' if m.get('dirty') else ''}", "",
             f"`{run['command']}`: {run['elapsed_s']:.0f} s of a {run['budget_s']:.0f} s budget"
             + ("" if run["finished"] else ", STILL RUNNING or cut off") + (" (dry run)" if summary["check"]["dry"] else ""),
             "", "All stages that ran passed." if run["ok"] else "SOME STAGES FAILED.", "",
             "| stage | status | s | tests ran / failed / errors / skipped | detail |", "|---|---|---|---|---|"]
    for r in summary["stages"]:
        t = r.get("tests")
        tests = f"{t['ran']} / {t['failures']} / {t['errors']} / {t['skipped']}" if t else ""
        detail = str(r.get("detail", "")).replace("|", "/")
        lines.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | {tests} | {detail[:160]} |")
    failures = [(r["stage"], f) for r in summary["stages"] for f in r.get("failures", [])]
    if failures:
        lines += ["", f"## Failed tests ({len(failures)})", ""]
        lines += [f"- {stage}: `{f['test']}`: {f.get('message', '')[:200]}" for stage, f in failures[:25]]
    lines += ["", "## Parity coverage (parameter dtype / history dtype)", ""]
    for backend, cells in correctness["coverage"].items():
        lines.append(f"- {backend}: " + ", ".join(f"{k} {v}" for k, v in cells.items()))
    lines.append("- graph capture and replay: " + ", ".join(
        f"{g['test'].split('::')[-1]} {g['outcome']}" for g in correctness["graph"]))
    lines += speed_md(speed.get("compare"), speed.get("memory"))
    lines += extra_md(extra)
    return "\n".join(lines) + "\n"


def _n(n: int) -> str:
    return f"{n:.0e}".replace("e+0", "e")


def speed_md(compare: dict | None, memory: dict | None) -> list[str]:
    lines = []
    if compare and compare.get("rows"):
        bw = compare["bandwidth"]["bytes_per_s"]
        lines += ["", f"## Step time, m = {SPEED_M}: ms (time / {compare.get('ours')}, % of the copy bandwidth, "
                      f"{bw / 1e9:.0f} GB/s read + written)", ""]

        def timing(r):
            ratio = f"{r['time_vs_ours']:.2f}x, " if r.get("time_vs_ours") else ""
            return f"{r['median_s'] * 1e3:.3g} ({ratio}{100 * r['fraction_of_copy_bandwidth']:.0f}%)"

        lines += _contender_table(compare["rows"], "median_s", timing)
        missing = [f"N={_n(c['n'])}: {', '.join(c['unavailable'])}" for c in compare.get("cases", []) if c.get("unavailable")]
        if missing:
            lines += ["", "Not running here: " + "; ".join(missing)]
    if memory and memory.get("rows"):
        lines += ["", "## Memory: peak per step above what is held, and state held, bytes per parameter", ""]
        lines += _contender_table(
            memory["rows"], "peak_bytes",
            lambda r: f"{r['peak_bytes_per_param']:.3g} / {r['state_bytes_per_param']:.3g}",
        )
    return lines


def _contender_table(rows: list[dict], measured_key: str, text) -> list[str]:
    """A markdown table of contenders by N: ``text(row)`` where the row holds
    ``measured_key``, else "skipped" or "ERROR"."""
    sizes = sorted({r["n"] for r in rows})
    names = list(dict.fromkeys(r["contender"] for r in rows))
    cell = {(r["contender"], r["n"]): r for r in rows}
    lines = ["| contender | " + " | ".join(_n(n) for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for name in names:
        row = []
        for n in sizes:
            r = cell.get((name, n))
            if r is None:
                row.append("")
            elif measured_key in r:
                row.append(text(r))
            else:
                row.append("skipped" if "skipped" in r else "ERROR")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


def extra_md(extra: dict) -> list[str]:
    lines = []
    lbfgs = extra.get("lbfgs")
    if lbfgs and lbfgs.get("rows"):
        from .lbfgs import table

        lines += ["", "## LBFGS per iteration", "", table(lbfgs["rows"])]
    training = extra.get("training")
    if training and training.get("runs"):
        lines += ["", f"## Training ({training['dataset']}, {training['epochs']} epochs)", "",
                  "| model | optimizer | seed | test acc | median step ms |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['optimizer']} | {r['seed']} | {r['final_test_acc']:.4f} "
                  f"| {r['median_step_ms']:.2f} |" for r in training["runs"]]
    return lines


# -- back on the development machine ---------------------------------------------------
def is_check_folder(folder: Path) -> bool:
    return (folder / "summary.json").exists() and not (folder / "validation").is_dir()


def merge_check(source: Path, out: Path | None = None) -> Path:
    """Unpack what a check left in ``source`` into ``out`` (default bench/results/<gpu>/, from
    the summary) with ``bench.gpu_validate``'s merge: the logs, the benchmark JSON, the
    summary (a stage still running when the call ended is recorded as cut off), the
    results files under ``validation/`` and SUMMARY.md as ``validation/CHECK.md``."""
    from .gpu_validate import merge_folder

    source = source.resolve()
    summary = json.loads((source / "summary.json").read_text())
    out = (out or RESULTS_DIR / summary["slug"]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (source / "logs.tar.gz").exists():
            with tarfile.open(source / "logs.tar.gz") as tar:
                tar.extractall(tmp, filter="data")
        (tmp / "validation").mkdir(exist_ok=True)
        for r in summary["stages"]:
            if r["status"] == "running":
                r["status"], r["detail"] = "cut off", f"still running when the call ended, after {r.get('seconds', 0)} s"
        (tmp / "validation" / "summary.json").write_text(json.dumps(summary, indent=1))
        for name in ("correctness.json", "speed.json", "extra.json"):
            if (source / name).exists():
                shutil.copyfile(source / name, tmp / "validation" / name)
        if (source / "SUMMARY.md").exists():
            shutil.copyfile(source / "SUMMARY.md", tmp / "validation" / "CHECK.md")
        # Results the archive lacks (it is written after them): from their copies.
        copies = {"step_compare.json": ("speed.json", "compare"), "memory.json": ("speed.json", "memory"),
                  "lbfgs.json": ("extra.json", "lbfgs"), "training.json": ("extra.json", "training")}
        for name, (holder, key) in copies.items():
            data = (_load(source / holder) or {}).get(key)
            if data and not (tmp / name).exists():
                (tmp / name).write_text(json.dumps(data, indent=1))
        if summary["machine"].get("commit") == "unknown":  # the GPU machine's copy has no git history
            from .machine import git_commit

            here = git_commit()
            note = (f"\nThe GPU machine's copy of the tree had no git history (its stamps say commit unknown); "
                    f"merged at commit {here['commit']}{' (with uncommitted changes)' if here['dirty'] else ''}.\n")
            with open(tmp / "validation" / "CHECK.md", "a") as f:
                f.write(note)
            print(note.strip(), flush=True)
        merge_folder(tmp, out)
    print(f"merged into {out}", flush=True)
    return out
