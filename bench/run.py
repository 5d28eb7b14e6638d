"""``make bench``: every benchmark of the suite, results in ``bench/results/<machine>/``.

Stages (``--only`` picks some): ``kernels`` (pytest-benchmark microbenchmarks,
in a subprocess: ``pytest bench/ --benchmark-only``), ``compare`` (whole step
side by side), ``memory`` (peak transient and persistent bytes), ``audit``
(in-place audit), ``train`` (training runs), then the plots and ``RESULTS.md``.
On the CPU, N stops at 1e7 (``--max-n``); on CUDA at 1e8.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .machine import BENCH_DIR, REPO_DIR, default_device, machine_stamp, results_dir

STAGES = ("kernels", "compare", "memory", "audit", "train")
SMOKE_SIZES = [1000, 4000]


def _write(out: Path, name: str, data: dict, device) -> None:
    data = {"machine": machine_stamp(device), **data}
    (out / name).write_text(json.dumps(data, indent=1, default=lambda o: asdict(o)))


def stage_kernels(out: Path, max_n: float, smoke: bool, threads: int | None) -> None:
    cmd = [sys.executable, "-m", "pytest", str(BENCH_DIR / "test_kernels.py"), "-q", "-p", "no:cacheprovider",
           f"--bench-max-n={max_n:g}"]
    if threads:
        cmd.append(f"--bench-threads={threads}")
    cmd += ["--bench-smoke", "--benchmark-disable"] if smoke else ["--benchmark-only", f"--benchmark-json={out / 'kernels.json'}"]
    print("  $", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO_DIR, check=True)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages of {STAGES}")
    parser.add_argument("--max-n", type=float, default=None, help="largest N (default 1e7 CPU, 1e8 CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<machine>/)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every stage once: checks that it runs")
    parser.add_argument("--train-args", default="", help="extra arguments for bench.train, e.g. '--epochs 5'")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every stage (default: torch's choice). On a shared VM whose "
                             "vCPUs are taken away at times, 1 avoids OpenMP barriers stalling for a scheduler tick")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    max_n = args.max_n or (1e8 if device.type == "cuda" else 1e7)
    sizes = SMOKE_SIZES if args.smoke else [n for n in (10**5, 10**6, 10**7, 10**8) if n <= max_n]
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench: {machine_stamp(device)['slug']}, N up to {sizes[-1]:.0e}, results in {out}", flush=True)
    started = time.perf_counter()
    timings = {}
    for stage in stages:
        t0 = time.perf_counter()
        print(f"[{stage}]", flush=True)
        if stage == "kernels":
            stage_kernels(out, sizes[-1], args.smoke, args.threads)
        elif stage == "compare":
            from .compare import compare_steps

            _write(out, "step_compare.json", compare_steps(device, sizes, smoke=args.smoke,
                                                           history_sizes=(2, 4) if args.smoke else (5, 10, 20),
                                                           default_m=4 if args.smoke else 10), device)
        elif stage == "memory":
            from .memory import measure_memory

            _write(out, "memory.json", measure_memory(device, sizes, m=4 if args.smoke else 10), device)
        elif stage == "audit":
            from .audit import format_audit, run_audit

            audit = run_audit(device, numel=4096 if args.smoke else 1 << 16)
            print(format_audit(audit))
            _write(out, "audit.json", audit, device)
        elif stage == "train":
            from . import train

            train_argv = ["--out", str(out)] + (["--smoke"] if args.smoke else shlex.split(args.train_args))
            if args.threads:
                train_argv += ["--threads", str(args.threads)]
            train.main(train_argv)
        timings[stage] = time.perf_counter() - t0
        print(f"[{stage}] {timings[stage]:.0f} s", flush=True)
    notes = []
    if device.type == "cpu":
        notes.append(
            f"CPU run: N capped at {sizes[-1]:.0e}; MLBFGS on the foreach backend (the Triton interpreter is far "
            "too slow to time); training with fewer epochs than on a GPU (see section 5), 3 seeds; "
            f"{torch.get_num_threads()} torch thread(s)."
        )
    if not args.smoke:
        previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
        run = {"command": command.strip(), "stages": timings, "elapsed_s": time.perf_counter() - started, "notes": notes}
        if set(stages) != set(STAGES) and previous:  # a partial rerun keeps the record of the full one
            run = {**previous, "partial_reruns": previous.get("partial_reruns", []) + [run]}
        _write(out, "run.json", run, device)
    from .report import make_report

    path = make_report(out)
    print(f"bench: {time.perf_counter() - started:.0f} s; report {path}", flush=True)
    return out


if __name__ == "__main__":
    main()
