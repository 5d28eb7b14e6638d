"""A whole GPU validation in one call, within a time budget, into one folder.

    python -m bench.gpu_validate --out bench/results/<gpu>/ --budget 1500
    make gpu-validate VALIDATE_ARGS="--out /tmp/h100 --budget 540"
    python -m bench.gpu_validate --check --out $OUT/gpu      # make gpu-check: bench/gpu_check.py

Stages, in order (``--stages`` picks some); each runs in a subprocess with the
real kernels (``TRITON_INTERPRET`` removed from its environment), its output in
a log under ``<out>/validation/``:

``env``        GPU, driver, versions, ``nvidia-smi -q`` (``env.json``, ``nvidia-smi.txt``)
``build``      this package installed into the running Python (``pip install --no-index
               --no-deps --no-build-isolation -e .``), its CUDA C++ kernels compiled for the
               GPU found only (``TORCH_CUDA_ARCH_LIST``) with every core (``MAX_JOBS``); skipped
               when the extension already loads and is newer than its sources (``--build``)
``cuda-tests`` the tests that need a GPU, on their own (``-p bench.cuda_only``)
``tests``      the whole test suite (``tests.log``, ``tests.xml``)
``sanitizer``  ``compute-sanitizer`` memcheck and racecheck over a few fused steps
               of every fused backend that runs on CUDA (pairs pushed, the ring
               wrapped, float32 and bfloat16), when the tool exists
``bench``      the benchmark stages one by one (``python -m bench.run --only S``),
               results in ``<out>`` itself (``RESULTS.md``, JSON, plots)
``ncu``        on request only (not in the default ``--stages``): Nsight Compute over the
               same fused steps at ``2^24`` elements, registers per thread, achieved
               occupancy, DRAM throughput and time per kernel (``ncu.csv``); it needs
               access to the GPU's performance counters

The stages of ``--check`` (bench/gpu_check.py) can also be named: ``parity``, ``speed``,
``lbfgs``, ``train`` (a short bench.run training stage) and ``rest-tests``.

A stage gets the smaller of its cap (``--cap stage=seconds``) and the budget left;
a stage the budget cannot start is recorded as skipped, never run half. The
summary (``validation/SUMMARY.md``, ``summary.json``) lists every stage with its
status, time and test counts; the exit status is 1 when a stage that ran failed
(a test stage in which no test ran counts as failed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .machine import REPO_DIR, machine_stamp, results_dir

STAGES = ("env", "build", "cuda-tests", "tests", "sanitizer", "bench")
OPTIONAL_STAGES = ("ncu", "parity", "speed", "lbfgs", "train", "rest-tests")
NCU_METRICS = (
    "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed", "gpu__time_duration.sum",
)
BENCH_STAGES = ("compare", "memory", "audit", "kernels", "train")
SANITIZER_TOOLS = ("memcheck", "racecheck")
CAPS = {  # seconds; the budget left bounds every one of them
    "env": 60, "build": 300, "cuda-tests": 300, "tests": 900, "sanitizer": 300,
    "compare": 300, "memory": 240, "audit": 120, "kernels": 420, "train": 900, "ncu": 300,
    "parity": 300, "speed": 600, "lbfgs": 300, "rest-tests": 900,
}
# Benchmark results whose rows a later call may extend rather than replace (bench.run --merge).
ROW_FILES = ("step_compare.json", "memory.json")
MIN_START = 20  # a stage with less budget left than this is skipped
RESERVE = 5  # kept for the summary
# A stage past its cap: SIGINT (pytest then writes its report), SIGTERM, SIGKILL, each
# after this many seconds of waiting for the one before; a stage can outlast its cap by the sum.
STOP_WAITS = (8, 4, 2)
TICK_S = 15  # while a stage runs, the runner's on_tick is called this often (bench/gpu_check.py)


# -- the fused step the sanitizer watches -------------------------------------------
def fused_steps(device: torch.device, numel: int = 3000) -> list[str]:
    """A few steps of every fused backend on ``device``: several tiles and blocks
    (a ``numel`` vector, a matrix, a tiny bias), pairs pushed from step 4 on and a
    ring of two that wraps, float32 and bfloat16. Returns the backends run; raises
    if a result is not finite."""
    from mlbfgs_fused import MLBFGS, backends

    names = [
        b.name for b in backends.REGISTRY.values()
        if b.fused and b.available() and device.type in b.supported_devices()
    ]
    for name in names:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device=device).manual_seed(0)
            shapes = [(numel,), (37, 129), (5,)]
            params = [
                torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype)) for s in shapes
            ]
            opt = MLBFGS(params, backend=name, history_size=2, update_period=2, blocks="tensor",
                         weight_decay=1e-3)
            for _ in range(9):
                for p in params:
                    g = torch.randn(p.shape, generator=gen, device=device).to(dtype)
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.copy_(g)
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise RuntimeError(f"backend {name!r}, {dtype}: a parameter is not finite")
            print(f"fused step: backend {name!r}, {dtype}: 9 steps, finite", flush=True)
    return names


# -- running stages -----------------------------------------------------------------
class Runner:
    """Runs stages one after the other within one deadline. Each finished stage (``done``)
    writes its record to ``validation/stage_<name>.json``; ``on_tick(runner)``, when given,
    is called after each and every ``TICK_S`` seconds while a stage runs (``running`` then
    holds its record), so that a caller can publish what is there so far."""

    def __init__(self, out: Path, budget: float, caps: dict, env: dict, on_tick=None):
        self.out, self.logs = out, out / "validation"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.caps, self.env = caps, env
        self.records: list[dict] = []
        self.running: dict | None = None
        self.on_tick = on_tick

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE

    def record(self, stage: str, status: str, **detail) -> dict:
        rec = {"stage": stage, "status": status, **detail}
        self.records.append(rec)
        extra = ", ".join(f"{k}={v}" for k, v in detail.items() if k in ("seconds", "tests", "detail"))
        print(f"[{stage}] {status}" + (f" ({extra})" if extra else ""), flush=True)
        self.done(rec)
        return rec

    def done(self, rec: dict) -> None:
        """(Re)write a stage's own JSON after its record changed, and publish."""
        (self.logs / f"stage_{rec['stage'].replace('-', '_')}.json").write_text(json.dumps(rec, indent=1))
        self.tick()

    def tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick(self)

    def run(self, stage: str, cmd: list[str], log_name: str, cap_key: str | None = None, env=None,
            interrupt: bool = False) -> dict:
        """Run ``cmd`` as stage ``stage`` for at most its cap (and the budget left), output in
        ``validation/<log_name>``. ``interrupt``: stop it with SIGINT first (pytest then still
        writes its JUnit report) before SIGTERM and SIGKILL."""
        timeout = min(self.caps[cap_key or stage], self.left())
        if timeout < MIN_START:
            return self.record(stage, "skipped", detail="time budget spent")
        log = self.logs / log_name
        print(f"[{stage}] $ {shlex.join(cmd)}  (up to {timeout:.0f} s, log {log})", flush=True)
        started = time.monotonic()
        self.running = {"stage": stage, "status": "running", "cap_s": round(timeout),
                        "log": str(log.relative_to(self.out))}
        with open(log, "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env or self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            self.tick()
            end = started + timeout
            while True:
                try:
                    rc = proc.wait(timeout=max(0.1, min(TICK_S, end - time.monotonic())))
                    status = "passed" if rc == 0 else "failed"
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() >= end:
                        _stop(proc, interrupt)
                        rc, status = None, "timeout"
                        break
                    self.running["seconds"] = round(time.monotonic() - started)
                    self.tick()
        self.running = None
        seconds = round(time.monotonic() - started, 1)
        rec = self.record(stage, status, rc=rc, seconds=seconds, log=str(log.relative_to(self.out)))
        if status != "passed":
            print(_tail(log, 40), flush=True)
        return rec


def _stop(proc: subprocess.Popen, interrupt: bool = False) -> None:
    """End a timed-out stage and everything it started (its own process group)."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
    for sig, wait in list(zip(signals, STOP_WAITS))[0 if interrupt else 1:]:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(f"    | {line}" for line in text[-lines:])


def junit_counts(path: Path) -> dict | None:
    """Counts of a pytest JUnit XML file: tests, failures, errors, skipped, ran."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:  # a report cut off while being written
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["ran"] = counts["tests"] - counts["skipped"]
    return counts


def junit_outcomes(path: Path) -> dict[str, dict]:
    """Each test of a pytest JUnit XML file by node id (``tests/test_x.py::name[id]``):
    its outcome (passed, failed, error, skipped), seconds and, unless it passed, the first
    line of its message."""
    if not path.exists():
        return {}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {}
    out = {}
    for case in root.iter("testcase"):
        module, name = case.get("classname", ""), case.get("name", "")
        parts = module.split(".")
        # classname: tests.test_x (a function) or tests.test_x.TestClass (a method)
        split = next((i for i in range(len(parts), 0, -1) if parts[i - 1].startswith("test_")), len(parts))
        nodeid = "/".join(parts[:split]) + ".py::" + "::".join(parts[split:] + [name])
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or child.text or "").strip().splitlines()[:1]
                message = message[0][:300] if message else ""
                break
        out[nodeid] = {"outcome": outcome, "seconds": round(float(case.get("time", 0) or 0), 2),
                       **({"message": message} if message is not None else {})}
    return out


def stage_env(runner: Runner, device: torch.device) -> None:
    started = time.monotonic()
    info = {"machine": machine_stamp(device), "python": sys.executable,
            "pytest_xdist": importlib.util.find_spec("xdist") is not None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "free_gib": round(free / 2**30, 1), "sm_count": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}", "torch_arch_list": torch.cuda.get_arch_list()}
    tools = {}
    for tool, args in (("nvidia-smi", ["-q"]), ("nvcc", ["--version"]), ("compute-sanitizer", ["--version"]),
                       ("ncu", ["--version"])):
        path = _find_tool(tool)
        tools[tool] = path
        if path and tool != "ncu":
            try:
                result = subprocess.run([path, *args], capture_output=True, text=True, check=False, timeout=30)
                text = result.stdout + result.stderr
            except subprocess.TimeoutExpired:
                text = f"{tool} {' '.join(args)}: no answer in 30 s\n"
            name = "nvidia-smi.txt" if tool == "nvidia-smi" else f"{tool}-version.txt"
            (runner.logs / name).write_text(text)
            if tool == "nvidia-smi":
                driver = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                               if line.strip().startswith("Driver Version")), None)
                info["driver"] = driver
    info["tools"] = tools
    (runner.logs / "env.json").write_text(json.dumps(info, indent=1))
    gpu = info.get("gpu", {}).get("name", "no GPU")
    driver = f", driver {info['driver']}" if info.get("driver") else ""
    runner.record("env", "passed", seconds=round(time.monotonic() - started, 1),
                  detail=f"{gpu}{driver}, torch {torch.__version__}, triton {info['machine']['triton']}")


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/local").glob("cuda*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


def stage_tests(runner: Runner, stage: str, pytest_args: list[str], selection: str | None = None,
                files=("tests",), collect_only: bool = False, needs_gpu: bool = False,
                device: torch.device | None = None) -> dict:
    """One pytest call. ``selection``: one of bench/check_tests.py's selections (else the
    ``cuda-tests`` stage takes ``-p bench.cuda_only``). ``collect_only`` (a dry run):
    collect, run nothing. ``needs_gpu`` without CUDA: the stage is recorded as skipped
    (after collecting, in a dry run)."""
    name = stage.replace("-", "_")
    xml = runner.logs / f"{name}.xml"
    report = runner.logs / f"{name}_selection.json"
    cmd = [sys.executable, "-m", "pytest", *files, "-ra", "-p", "no:cacheprovider", "--durations=15",
           f"--junitxml={xml}"]
    if selection is not None:
        cmd += ["-p", "bench.check_tests", f"--check-select={selection}", f"--check-report={report}"]
    elif stage == "cuda-tests":
        cmd += ["-p", "bench.cuda_only"]
    no_gpu = needs_gpu and (device is None or device.type != "cuda")
    if no_gpu and not collect_only:
        return runner.record(stage, "skipped", detail="needs CUDA (torch.cuda.is_available() is False)")
    if collect_only:
        cmd += ["--collect-only", "-q"]
    rec = runner.run(stage, cmd + pytest_args, f"{name}.log", interrupt=True)
    selected = json.loads(report.read_text()) if report.exists() else None
    if selected is not None:
        rec["selected"] = len(selected["selected"])
        missing = selected["missing"]
        if device is None or device.type != "cuda":
            from .check_tests import needs_cuda_to_collect

            missing = [nodeid for nodeid in missing if not needs_cuda_to_collect(nodeid)]
        if missing:
            rec["missing"] = missing
    if collect_only:
        if rec["status"] == "passed" or (rec["status"] == "failed" and rec["rc"] == 5):
            collected = rec.get("selected", "the")
            rec["status"] = "skipped" if no_gpu else "passed"
            rec["detail"] = ("needs CUDA; " if no_gpu else "") + f"dry run: {collected} tests collected, none run"
    else:
        counts = junit_counts(xml)
        if counts is not None:
            rec["tests"] = counts
            print(f"[{stage}] {counts}", flush=True)
            outcomes = junit_outcomes(xml)
            rec["failures"] = [{"test": k, **v} for k, v in outcomes.items() if v["outcome"] in ("failed", "error")]
        if rec["status"] in ("passed", "failed") and (counts is None or counts["ran"] == 0):
            rec["status"], rec["detail"] = "failed", "no test ran"
            print(f"[{stage}] failed: no test ran", flush=True)
    if rec.get("missing"):
        rec["status"] = "failed"
        rec["detail"] = f"selected tests not collected: {rec['missing']}"
        print(f"[{stage}] failed: selected tests not collected: {rec['missing']}", flush=True)
    runner.done(rec)
    return rec


def stage_sanitizer(runner: Runner, device: torch.device, tools: list[str], dry: bool = False) -> None:
    """compute-sanitizer over :func:`fused_steps` (each fused CUDA backend). Without CUDA
    or the tool it is skipped; a dry run then runs the program alone (the Triton kernels
    through the interpreter), which shows that what the sanitizer would watch runs."""
    sanitizer = _find_tool("compute-sanitizer")
    program = [sys.executable, "-m", "bench.gpu_validate", "--fused-steps-only"]
    if device.type != "cuda" or sanitizer is None:
        runner.record("sanitizer", "skipped", detail="needs CUDA and compute-sanitizer")
        if dry:
            env = {**runner.env, "TRITON_INTERPRET": "1"} if device.type != "cuda" else runner.env
            runner.run("fused-steps", program + ["--fused-steps-numel=300"], "fused_steps.log",
                       cap_key="sanitizer", env=env)
        return
    for tool in tools:
        env = dict(runner.env)
        if tool == "memcheck":
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # so an overrun leaves its allocation
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "50", *program]
        rec = runner.run(f"sanitizer-{tool}", cmd, f"sanitizer_{tool}.log", cap_key="sanitizer", env=env)
        log = runner.logs / f"sanitizer_{tool}.log"
        if log.exists():
            lines = log.read_text(errors="replace").splitlines()
            found = [line.strip("= ").strip() for line in lines if "ERROR SUMMARY" in line]
            backends = [line.split("backend ", 1)[1].split(":")[0] for line in lines if line.startswith("fused step:")]
            rec["detail"] = "; ".join(found[-1:] + [f"stepped: {', '.join(dict.fromkeys(backends)) or 'nothing'}"])
            runner.done(rec)


EXTENSION_CHECK_S = 20  # the build stage's look at the extension after pip, beyond its cap


def extension_state(env: dict) -> dict:
    """Whether this package's C++ extension loads in a fresh process, and with CUDA kernels."""
    code = ("import json\nfrom mlbfgs_fused.backends import native\n"
            "print(json.dumps({'load_error': native.load_error(), 'cuda_kernels': native.has_cuda_kernels()}))")
    try:
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO_DIR, env=env, capture_output=True, text=True,
                                check=False, timeout=EXTENSION_CHECK_S)
    except subprocess.TimeoutExpired:
        return {"load_error": f"no answer in {EXTENSION_CHECK_S} s", "cuda_kernels": False}
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"load_error": (result.stderr.strip().splitlines() or ["no answer"])[-1], "cuda_kernels": False}


def _extension_is_fresh() -> bool:
    """The built extension of this Python exists and is newer than every source it is built from."""
    built = REPO_DIR / "mlbfgs_fused" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    if not built.exists():
        return False
    sources = [REPO_DIR / "setup.py", *(p for p in (REPO_DIR / "csrc").rglob("*") if p.is_file())]
    return all(p.stat().st_mtime <= built.stat().st_mtime for p in sources)


def stage_build(runner: Runner, device: torch.device, mode: str = "auto") -> None:
    """Install this package into the running Python against its own torch, offline, and
    build its C++ extension: the CUDA kernels for this GPU's architecture only, every core
    compiling. ``mode``: ``auto`` skips the build when the extension is newer than its
    sources and loads (with CUDA kernels where there is a GPU), ``always``, ``never``.
    The build installs without the extension when the compiler fails (setup.py), so the
    stage passes only when the extension then loads."""
    if mode == "never":
        runner.record("build", "skipped", detail="--build never")
        return
    cuda = device.type == "cuda"
    if mode == "auto" and _extension_is_fresh():
        started = time.monotonic()
        state = extension_state(runner.env)
        if state["load_error"] is None and (state["cuda_kernels"] or not cuda):
            runner.record("build", "passed", seconds=round(time.monotonic() - started, 1),
                          detail="already built: the extension loads" + (", CUDA kernels included" if cuda else ""))
            return
    env = {**runner.env, "MAX_JOBS": str(os.cpu_count() or 1), "PIP_NO_INDEX": "1",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
           # The interpreter's own bin first: ninja (a parallel build) installed beside it
           # is found even when that folder is not on PATH.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), runner.env.get("PATH", "")])}
    arch = None
    if cuda:
        major, minor = torch.cuda.get_device_capability(device)
        arch = env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."]
    ninja = shutil.which("ninja", path=env["PATH"])
    rec = runner.run("build", cmd, "build.log", env=env)
    rec.update(arch=arch, jobs=int(env["MAX_JOBS"]), ninja=ninja)
    if rec["status"] == "passed":
        state = extension_state(runner.env)
        if state["load_error"] is not None:
            rec["status"], rec["detail"] = "failed", f"installed, but the extension does not load: {state['load_error']}"
        elif cuda and not state["cuda_kernels"]:
            rec["status"], rec["detail"] = "failed", "the extension loads without its CUDA kernels (see build.log)"
        else:
            rec["detail"] = "built" + (f": CUDA kernels for compute capability {arch}" if cuda else " (no CUDA)")
            if ninja is None:
                rec["detail"] += "; no ninja found: a build one source at a time"
    runner.done(rec)


def stage_speed(runner: Runner, run_args: list[str]) -> None:
    """The compare and memory stages of bench.run in one process (results in the folder itself)."""
    cmd = [sys.executable, "-m", "bench.run", "--only", "compare,memory", "--out", str(runner.out), "--no-report",
           *run_args]
    rec = runner.run("speed", cmd, "speed.log")
    detail = []
    for name in ("step_compare.json", "memory.json"):
        path = runner.out / name
        if path.exists():
            rows = json.loads(path.read_text())["rows"]
            measured = sum("median_s" in r or "peak_bytes" in r for r in rows)
            not_run = [f"{r['contender']} N={r['n']:.0e}: {r.get('error') or r.get('skipped')}"
                       for r in rows if "error" in r or "skipped" in r]
            detail.append(f"{name}: {measured} rows measured, {len(not_run)} not")
            if not_run:
                rec.setdefault("not_measured", []).extend(not_run)
    if detail:
        rec["detail"] = "; ".join(detail)
        runner.done(rec)


def stage_lbfgs(runner: Runner, lbfgs_args: list[str]) -> None:
    """``python -m bench.lbfgs``: LBFGS's time per iteration beside torch.optim.LBFGS."""
    cmd = [sys.executable, "-m", "bench.lbfgs", "--out", str(runner.out / "lbfgs.json"), *lbfgs_args]
    runner.run("lbfgs", cmd, "lbfgs.log")


def stage_ncu(runner: Runner, device: torch.device) -> None:
    ncu = _find_tool("ncu")
    if device.type != "cuda" or ncu is None:
        runner.record("ncu", "skipped", detail="needs CUDA and ncu")
        return
    cmd = [ncu, "--csv", "--log-file", str(runner.logs / "ncu.csv"), "--metrics", ",".join(NCU_METRICS),
           sys.executable, "-m", "bench.gpu_validate", "--fused-steps-only", f"--fused-steps-numel={1 << 24}"]
    runner.run("ncu", cmd, "ncu.log")


def stage_bench(runner: Runner, bench_stages: list[str], bench_args: list[str], train_args: str) -> None:
    for st in bench_stages:
        cmd = [sys.executable, "-m", "bench.run", "--only", st, "--out", str(runner.out), *bench_args]
        if st == "train" and train_args:
            cmd += ["--train-args", train_args]
        runner.run(f"bench-{st}", cmd, f"bench_{st}.log", cap_key=st)


def write_summary(runner: Runner, args: argparse.Namespace, started: float) -> bool:
    """Write ``summary.json`` and ``SUMMARY.md``; returns whether every stage run now passed.
    A folder that already holds a summary (an earlier call into the same folder) keeps
    the records of the stages not run this time."""
    ok = all(r["status"] in ("passed", "skipped") for r in runner.records)
    run = {
        "command": "python -m bench.gpu_validate " + shlex.join(args.argv),
        "budget_s": args.budget,
        "elapsed_s": round(time.time() - started, 1),
        "ok": ok,
    }
    summary = merge_summaries(read_summary(runner.logs), {"runs": [run], "stages": runner.records})
    write_summary_files(runner.logs, summary)
    return ok


def read_summary(logs: Path) -> dict | None:
    path = logs / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    if "runs" not in summary:  # a summary of one call, as written before calls were merged
        run = {k: summary[k] for k in ("command", "budget_s", "elapsed_s", "ok") if k in summary}
        summary = {"runs": [run], "stages": summary.get("stages", [])}
    return summary


def merge_summaries(older: dict | None, newer: dict) -> dict:
    """Both calls' commands, and each stage's record from the newer call where it ran
    that stage, else from the older one (in the older call's order, new stages after)."""
    if older is None:
        return newer
    fresh = {r["stage"]: r for r in newer["stages"]}
    stages = [fresh.pop(r["stage"], r) for r in older["stages"]] + list(fresh.values())
    return {"runs": older["runs"] + newer["runs"], "stages": stages}


def write_summary_files(logs: Path, summary: dict) -> None:
    (logs / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = all(r["status"] in ("passed", "skipped") for r in summary["stages"])
    lines = ["# GPU validation", ""]
    for run in summary["runs"]:
        lines.append(f"- `{run['command']}`: {run['elapsed_s']:.0f} s of a {run['budget_s']:.0f} s budget")
    lines += [
        "", "Every stage that ran passed." if ok else "SOME STAGES FAILED.", "",
        "| stage | status | seconds | tests (ran / failed / errors / skipped) | log |",
        "|---|---|---|---|---|",
    ]
    for r in summary["stages"]:
        t = r.get("tests")
        tests = f"{t['ran']} / {t['failures']} / {t['errors']} / {t['skipped']}" if t else ""
        status = r["status"] + (f": {r['detail']}" if r.get("detail") and r["stage"] != "env" else "")
        lines.append(f"| {r['stage']} | {status} | {r.get('seconds', '')} | {tests} | {r.get('log', '')} |")
    env_detail = next((r.get("detail") for r in summary["stages"] if r["stage"] == "env"), None)
    if env_detail:
        lines += ["", f"Machine: {env_detail}."]
    text = "\n".join(lines) + "\n"
    (logs / "SUMMARY.md").write_text(text)
    print("\n" + text, flush=True)


def merge_folder(source: Path, out: Path) -> None:
    """Copy one call's results folder into ``out`` (files of the same name replaced, except
    the compare and memory tables, whose rows are merged as ``bench.run --merge`` does), merging
    the validation summaries, then rebuild the benchmark report when there is JSON for it.
    How the results of several calls (each into its own, emptied, folder) become one."""
    source, out = source.resolve(), out.resolve()
    if not (source / "validation").is_dir():
        raise SystemExit(f"{source} holds no validation/ folder: not the output of bench.gpu_validate")
    older = read_summary(out / "validation")
    newer = read_summary(source / "validation")
    from .run import merge_rows

    for path in sorted(source.rglob("*")):
        if path.is_file() and path.relative_to(source) != Path("validation/summary.json"):
            target = out / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if path.name in ROW_FILES and target.exists():  # a stage split over calls: rows of both
                merged = merge_rows(json.loads(target.read_text()), json.loads(path.read_text()))
                target.write_text(json.dumps(merged, indent=1))
            else:
                shutil.copyfile(path, target)
    (out / "validation").mkdir(parents=True, exist_ok=True)
    if newer is not None:
        write_summary_files(out / "validation", merge_summaries(older, newer))
    if any(out.glob("*.json")):
        from .report import make_report

        print(f"report: {make_report(out)}", flush=True)


def _csv(text: str, allowed: tuple[str, ...], parser: argparse.ArgumentParser, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in items if s not in allowed]
    if unknown:
        parser.error(f"unknown {what} {unknown} (expected some of {allowed})")
    return items


def run_stage(runner: Runner, stage: str, device: torch.device, args: argparse.Namespace) -> None:
    """Run one stage (of STAGES or OPTIONAL_STAGES) with the options of ``args``."""
    from . import check_tests, gpu_check

    pytest_args, dry = shlex.split(args.pytest_args), args.dry
    if stage == "env":
        stage_env(runner, device)
    elif stage == "build":
        stage_build(runner, device, args.build)
    elif stage == "cuda-tests":
        selection = "cuda" if args.check else None
        stage_tests(runner, stage, pytest_args, selection=selection, collect_only=dry, needs_gpu=True, device=device)
    elif stage == "parity":
        stage_tests(runner, stage, pytest_args, selection="parity", files=check_tests.parity_files(),
                    collect_only=dry, device=device)
    elif stage == "tests":
        stage_tests(runner, stage, pytest_args, collect_only=dry, device=device)
    elif stage == "rest-tests":
        stage_tests(runner, stage, pytest_args + gpu_check.parallel_args(), selection="rest",
                    collect_only=dry, device=device)
    elif stage == "sanitizer":
        stage_sanitizer(runner, device, args.tools, dry=dry)
    elif stage == "ncu":
        stage_ncu(runner, device)
    elif stage == "speed":
        stage_speed(runner, gpu_check.speed_args(device, dry) + shlex.split(args.bench_args))
    elif stage == "lbfgs":
        stage_lbfgs(runner, gpu_check.lbfgs_args(device, dry))
    elif stage == "train":
        bench_args = ["--no-report"] + (["--smoke"] if dry else [])
        stage_bench(runner, ["train"], bench_args, args.train_args or gpu_check.TRAIN_ARGS)
    elif stage == "bench":
        bench_args = shlex.split(args.bench_args) + (["--smoke"] if dry else [])
        stage_bench(runner, args.bench_stage_list, bench_args, args.train_args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<gpu>/)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for everything (default 1800; with --check bench/gpu_check.py's CHECK_BUDGET)")
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated, of {STAGES + OPTIONAL_STAGES} (default {','.join(STAGES)}; "
                             "with --check bench/gpu_check.py's CHECK_STAGES)")
    parser.add_argument("--bench-stages", default=",".join(BENCH_STAGES), help=f"comma-separated, of {BENCH_STAGES}")
    parser.add_argument("--bench-args", default="", help="extra options of bench.run, written with '=': --bench-args='--max-n 1e7'")
    parser.add_argument("--train-args", default="", help="options of bench.train, written with '=': --train-args='--epochs 3 --seeds 2'")
    parser.add_argument("--pytest-args", default="", help="extra pytest options of the test stages, written with '=': --pytest-args='-x'")
    parser.add_argument("--sanitizer-tools", default=None,
                        help="compute-sanitizer tools (memcheck, racecheck, synccheck, initcheck; default "
                             "memcheck,racecheck, with --check memcheck)")
    parser.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                        help=f"override a stage's cap (defaults {CAPS}; with --check bench/gpu_check.py's CHECK_CAPS)")
    parser.add_argument("--build", choices=("auto", "always", "never"), default="auto",
                        help="the build stage: auto (when the extension is missing, older than its sources or "
                             "without CUDA kernels on a GPU), always, never")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a GPU (checks the plumbing; kernels through the interpreter)")
    parser.add_argument("--check", action="store_true",
                        help="the first-GPU-run preset (bench/gpu_check.py, bench/README.md): its stages, caps and "
                             "budget; logs in --work, at most 6 files in --out, refreshed as it goes")
    parser.add_argument("--dry", action="store_true",
                        help="tiny sizes, tests collected but not run, no GPU needed (implies --allow-cpu)")
    parser.add_argument("--work", type=Path, default=None,
                        help="with --check: the folder of every log and result (default: a new temporary folder)")
    parser.add_argument("--plan", action="store_true",
                        help="with --check: print each stage's cap and estimated seconds, run nothing")
    parser.add_argument("--merge", type=Path, default=None, metavar="FOLDER",
                        help="copy an earlier call's results FOLDER into --out, merging the summaries, "
                             "and rebuild the report; runs nothing (no GPU needed). A --check folder is "
                             "unpacked, into bench/results/<gpu>/ unless --out names another")
    parser.add_argument("--fused-steps-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fused-steps-numel", type=int, default=3000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv

    if args.merge is not None:
        from . import gpu_check

        if gpu_check.is_check_folder(args.merge):
            gpu_check.merge_check(args.merge, args.out)
            return 0
        if args.out is None:
            parser.error("--merge needs --out, the folder that collects the calls' results")
        merge_folder(args.merge, args.out)
        return 0
    if args.check and args.plan:
        from . import gpu_check

        print(gpu_check.format_plan(gpu_check.time_plan()))
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.fused_steps_only:  # the program compute-sanitizer runs
        if not fused_steps(device, args.fused_steps_numel):
            print("no fused backend runs on this device", flush=True)
        return 0
    if not cuda and not (args.allow_cpu or args.dry):
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False); --allow-cpu checks the plumbing")
    if args.check:
        from . import gpu_check

        defaults = dict(stages=gpu_check.CHECK_STAGES, caps=gpu_check.CHECK_CAPS, budget=gpu_check.CHECK_BUDGET,
                        tools=gpu_check.CHECK_SANITIZER_TOOLS)
        if args.out is None:
            parser.error("--check needs --out, the folder its few files go to (e.g. --out $OUT/gpu)")
    else:
        defaults = dict(stages=STAGES, caps=CAPS, budget=1800, tools=SANITIZER_TOOLS)
    stages = _csv(args.stages or ",".join(defaults["stages"]), STAGES + OPTIONAL_STAGES, parser, "stages")
    args.bench_stage_list = _csv(args.bench_stages, BENCH_STAGES, parser, "bench stages")
    args.tools = _csv(args.sanitizer_tools or ",".join(defaults["tools"]),
                      ("memcheck", "racecheck", "synccheck", "initcheck"), parser, "tools")
    caps = dict(defaults["caps"])
    for item in args.cap:
        key, _, value = item.partition("=")
        if key not in caps or not value:
            parser.error(f"--cap takes STAGE=SECONDS with STAGE one of {sorted(caps)}, got {item!r}")
        caps[key] = float(value)
    args.budget = defaults["budget"] if args.budget is None else args.budget

    env = dict(os.environ)
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # the real kernels
    if args.check:
        from . import gpu_check

        return gpu_check.run_check(args, stages, caps, device, env)
    out = (args.out or results_dir(device)).resolve()
    started = time.time()
    runner = Runner(out, args.budget, caps, env)
    print(f"gpu_validate: {', '.join(stages)} into {out}, budget {args.budget:.0f} s", flush=True)
    for stage in stages:
        run_stage(runner, stage, device, args)
    return 0 if write_summary(runner, args, started) else 1


if __name__ == "__main__":
    sys.exit(main())
