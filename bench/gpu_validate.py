"""A whole GPU validation in one call, within a time budget, into one folder.

    python -m bench.gpu_validate --out bench/results/<gpu>/ --budget 1500
    make gpu-validate VALIDATE_ARGS="--out /tmp/h100 --budget 540"

Stages, in order (``--stages`` picks some); each runs in a subprocess with the
real kernels (``TRITON_INTERPRET`` removed from its environment), its output in
a log under ``<out>/validation/``:

``env``        GPU, driver, versions, ``nvidia-smi -q`` (``env.json``, ``nvidia-smi.txt``)
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

A stage gets the smaller of its cap (``--cap stage=seconds``) and the budget left;
a stage the budget cannot start is recorded as skipped, never run half. The
summary (``validation/SUMMARY.md``, ``summary.json``) lists every stage with its
status, time and test counts; the exit status is 1 when a stage that ran failed
(a test stage in which no test ran counts as failed).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from .machine import REPO_DIR, machine_stamp, results_dir

STAGES = ("env", "cuda-tests", "tests", "sanitizer", "bench")
OPTIONAL_STAGES = ("ncu",)
NCU_METRICS = (
    "launch__registers_per_thread", "sm__warps_active.avg.pct_of_peak_sustained_active",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed", "gpu__time_duration.sum",
)
BENCH_STAGES = ("compare", "memory", "audit", "kernels", "train")
SANITIZER_TOOLS = ("memcheck", "racecheck")
CAPS = {  # seconds; the budget left bounds every one of them
    "env": 60, "cuda-tests": 300, "tests": 900, "sanitizer": 300,
    "compare": 300, "memory": 240, "audit": 120, "kernels": 420, "train": 900, "ncu": 300,
}
# Benchmark results whose rows a later call may extend rather than replace (bench.run --merge).
ROW_FILES = ("step_compare.json", "memory.json")
MIN_START = 20  # a stage with less budget left than this is skipped
RESERVE = 5  # kept for the summary


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
    def __init__(self, out: Path, budget: float, caps: dict, env: dict):
        self.out, self.logs = out, out / "validation"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.caps, self.env = caps, env
        self.records: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE

    def record(self, stage: str, status: str, **detail) -> dict:
        rec = {"stage": stage, "status": status, **detail}
        self.records.append(rec)
        extra = ", ".join(f"{k}={v}" for k, v in detail.items() if k in ("seconds", "tests", "detail"))
        print(f"[{stage}] {status}" + (f" ({extra})" if extra else ""), flush=True)
        return rec

    def run(self, stage: str, cmd: list[str], log_name: str, cap_key: str | None = None, env=None) -> dict:
        timeout = min(self.caps[cap_key or stage], self.left())
        if timeout < MIN_START:
            return self.record(stage, "skipped", detail="time budget spent")
        log = self.logs / log_name
        print(f"[{stage}] $ {shlex.join(cmd)}  (up to {timeout:.0f} s, log {log})", flush=True)
        started = time.monotonic()
        with open(log, "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO_DIR, env=env or self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = "passed" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                _stop(proc)
                rc, status = None, "timeout"
        seconds = round(time.monotonic() - started, 1)
        rec = self.record(stage, status, rc=rc, seconds=seconds, log=str(log.relative_to(self.out)))
        if status != "passed":
            print(_tail(log, 40), flush=True)
        return rec


def _stop(proc: subprocess.Popen) -> None:
    """End a timed-out stage and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
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
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["ran"] = counts["tests"] - counts["skipped"]
    return counts


def stage_env(runner: Runner, device: torch.device) -> None:
    started = time.monotonic()
    info = {"machine": machine_stamp(device), "python": sys.executable}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "sm_count": props.multi_processor_count,
                       "capability": f"{props.major}.{props.minor}"}
    tools = {}
    for tool, args in (("nvidia-smi", ["-q"]), ("nvcc", ["--version"]), ("compute-sanitizer", ["--version"]),
                       ("ncu", ["--version"])):
        path = _find_tool(tool)
        tools[tool] = path
        if path and tool != "ncu":
            result = subprocess.run([path, *args], capture_output=True, text=True, check=False)
            name = "nvidia-smi.txt" if tool == "nvidia-smi" else f"{tool}-version.txt"
            (runner.logs / name).write_text(result.stdout + result.stderr)
    info["tools"] = tools
    (runner.logs / "env.json").write_text(json.dumps(info, indent=1))
    gpu = info.get("gpu", {}).get("name", "no GPU")
    runner.record("env", "passed", seconds=round(time.monotonic() - started, 1),
                  detail=f"{gpu}, torch {torch.__version__}, triton {info['machine']['triton']}")


def _find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for root in sorted(Path("/usr/local").glob("cuda*/bin"), reverse=True):
        if (root / name).exists():
            return str(root / name)
    return None


def stage_tests(runner: Runner, stage: str, pytest_args: list[str]) -> None:
    name = stage.replace("-", "_")
    xml = runner.logs / f"{name}.xml"
    cmd = [sys.executable, "-m", "pytest", "tests", "-ra", "-p", "no:cacheprovider", "--durations=15",
           f"--junitxml={xml}"]
    if stage == "cuda-tests":
        cmd += ["-p", "bench.cuda_only"]
    rec = runner.run(stage, cmd + pytest_args, f"{name}.log")
    counts = junit_counts(xml)
    if counts is not None:
        rec["tests"] = counts
        print(f"[{stage}] {counts}", flush=True)
    if rec["status"] in ("passed", "failed") and (counts is None or counts["ran"] == 0):
        rec["status"], rec["detail"] = "failed", "no test ran"
        print(f"[{stage}] failed: no test ran", flush=True)


def stage_sanitizer(runner: Runner, device: torch.device, tools: list[str]) -> None:
    sanitizer = _find_tool("compute-sanitizer")
    if device.type != "cuda" or sanitizer is None:
        runner.record("sanitizer", "skipped", detail="needs CUDA and compute-sanitizer")
        return
    for tool in tools:
        env = dict(runner.env)
        if tool == "memcheck":
            env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # so an overrun leaves its allocation
        cmd = [sanitizer, "--tool", tool, "--error-exitcode", "1", sys.executable, "-m", "bench.gpu_validate",
               "--fused-steps-only"]
        runner.run(f"sanitizer-{tool}", cmd, f"sanitizer_{tool}.log", cap_key="sanitizer", env=env)


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results/<gpu>/)")
    parser.add_argument("--budget", type=float, default=1800, help="seconds for everything (default 1800)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated, of {STAGES + OPTIONAL_STAGES} (default {','.join(STAGES)})")
    parser.add_argument("--bench-stages", default=",".join(BENCH_STAGES), help=f"comma-separated, of {BENCH_STAGES}")
    parser.add_argument("--bench-args", default="", help="extra options of bench.run, written with '=': --bench-args='--max-n 1e7'")
    parser.add_argument("--train-args", default="", help="options of bench.train, written with '=': --train-args='--epochs 3 --seeds 2'")
    parser.add_argument("--pytest-args", default="", help="extra pytest options of the test stages, written with '=': --pytest-args='-x'")
    parser.add_argument("--sanitizer-tools", default=",".join(SANITIZER_TOOLS),
                        help="compute-sanitizer tools (memcheck, racecheck, synccheck, initcheck)")
    parser.add_argument("--cap", action="append", default=[], metavar="STAGE=SECONDS",
                        help=f"override a stage's cap (defaults {CAPS})")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a GPU (checks the plumbing; kernels through the interpreter)")
    parser.add_argument("--merge", type=Path, default=None, metavar="FOLDER",
                        help="copy an earlier call's results FOLDER into --out, merging the summaries, "
                             "and rebuild the report; runs nothing (no GPU needed)")
    parser.add_argument("--fused-steps-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fused-steps-numel", type=int, default=3000, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv

    if args.merge is not None:
        if args.out is None:
            parser.error("--merge needs --out, the folder that collects the calls' results")
        merge_folder(args.merge, args.out)
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.fused_steps_only:  # the program compute-sanitizer runs
        if not fused_steps(device, args.fused_steps_numel):
            print("no fused backend runs on this device", flush=True)
        return 0
    if not cuda and not args.allow_cpu:
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False); --allow-cpu checks the plumbing")
    stages = _csv(args.stages, STAGES + OPTIONAL_STAGES, parser, "stages")
    bench_stages = _csv(args.bench_stages, BENCH_STAGES, parser, "bench stages")
    tools = _csv(args.sanitizer_tools, ("memcheck", "racecheck", "synccheck", "initcheck"), parser, "tools")
    caps = dict(CAPS)
    for item in args.cap:
        key, _, value = item.partition("=")
        if key not in caps or not value:
            parser.error(f"--cap takes STAGE=SECONDS with STAGE one of {sorted(caps)}, got {item!r}")
        caps[key] = float(value)

    out = (args.out or results_dir(device)).resolve()
    env = dict(os.environ)
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # the real kernels
    started = time.time()
    runner = Runner(out, args.budget, caps, env)
    print(f"gpu_validate: {', '.join(stages)} into {out}, budget {args.budget:.0f} s", flush=True)
    for stage in stages:
        if stage == "env":
            stage_env(runner, device)
        elif stage in ("cuda-tests", "tests"):
            stage_tests(runner, stage, shlex.split(args.pytest_args))
        elif stage == "sanitizer":
            stage_sanitizer(runner, device, tools)
        elif stage == "ncu":
            stage_ncu(runner, device)
        elif stage == "bench":
            stage_bench(runner, bench_stages, shlex.split(args.bench_args), args.train_args)
    return 0 if write_summary(runner, args, started) else 1


if __name__ == "__main__":
    sys.exit(main())
