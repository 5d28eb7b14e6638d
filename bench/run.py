"""``make bench``: every benchmark of the suite, results in ``bench/results/<machine>/``.

Stages (``--only`` picks some): ``kernels`` (pytest-benchmark microbenchmarks,
in a subprocess: ``pytest bench/ --benchmark-only``), ``compare`` (whole step
side by side), ``memory`` (peak transient and persistent bytes), ``audit``
(in-place audit), ``roofline`` (every backend's passes and steps against the
machine's bandwidth, ``bench/roofline.py``), ``train`` (training runs), then the
plots and ``RESULTS.md``.
Sizes (``--sizes``): N = 1e5, 1e6, 1e7 on the CPU; on CUDA also 1e8, and N = 3e8
for our contenders only (``--ours-only-sizes``). ``--merge`` adds the rows of a
run to those already in ``--out`` (a long stage split over several calls).
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

STAGES = ("kernels", "compare", "memory", "audit", "roofline", "train")
SMOKE_SIZES = [1000, 4000]
SMOKE_OURS_ONLY_SIZES = [8000]
SIZES = [10**5, 10**6, 10**7, 10**8]
CUDA_OURS_ONLY_SIZES = [3 * 10**8]  # ours only: 2^31 history elements crossed at m = 10
ROW_KEY = ("contender", "n", "m")


def _sizes(text: str) -> list[int]:
    """``"1e5,1e6"`` -> ``[100000, 1000000]``; ``""`` -> ``[]``."""
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _names_at(text: str) -> dict[int, list[str]]:
    """``"1e5=a,b"`` -> ``{100000: ["a", "b"]}``."""
    n, sep, names = text.partition("=")
    if not sep or not n.strip():
        raise argparse.ArgumentTypeError(f"expected N=NAMES, got {text!r}")
    return {int(float(n)): _names(names)}


def _bytes(text: str) -> int:
    """``"40e9"``, ``"40G"`` (10^9), ``"40GiB"`` (2^30) -> bytes."""
    units = {"gib": 1 << 30, "mib": 1 << 20, "g": 10**9, "gb": 10**9, "m": 10**6, "mb": 10**6}
    lowered = text.strip().lower()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * scale)
    return int(float(lowered))


def merge_rows(previous: dict | None, new: dict) -> dict:
    """``new`` with the rows (and cases) of ``previous`` it did not measure again."""
    if not previous:
        return new
    if previous.get("machine", {}).get("slug") not in (None, new["machine"]["slug"]):
        raise SystemExit(f"bench: --merge: {previous['machine']['slug']!r} results are not this machine's")
    measured = {tuple(r[k] for k in ROW_KEY) for r in new["rows"]}
    merged = {**new, "rows": [r for r in previous["rows"] if tuple(r[k] for k in ROW_KEY) not in measured] + new["rows"]}
    if "cases" in new:
        cases = {(c["n"], c["m"]) for c in new["cases"]}
        merged["cases"] = [c for c in previous.get("cases", []) if (c["n"], c["m"]) not in cases] + new["cases"]
    return merged


def _write(out: Path, name: str, data: dict, device, previous: dict | None = None) -> dict:
    data = merge_rows(previous, {"machine": machine_stamp(device), **data})
    (out / name).write_text(json.dumps(data, indent=1, default=lambda o: asdict(o)))
    return data


def _previous(out: Path, name: str, merge: bool) -> dict | None:
    path = out / name
    return json.loads(path.read_text()) if merge and path.exists() else None


def _failures(data: dict) -> list[str]:
    return [f"{r['contender']} N={r['n']:.0e} m={r['m']}: {r['error']}" for r in data["rows"] if "error" in r]


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
    parser.add_argument("--max-n", type=float, default=None,
                        help="largest N of every list (default: 1e7 on the CPU, 1e8 on CUDA for the default --sizes)")
    parser.add_argument("--sizes", type=_sizes, default=None,
                        help=f"comma-separated N of every contender (default {','.join(f'{n:.0e}' for n in SIZES)}, "
                             "the CPU up to 1e7); history sizes are swept at the largest")
    parser.add_argument("--ours-only-sizes", type=_sizes, default=None,
                        help="comma-separated N for our contenders only, m = 10, in compare and memory "
                             "(default 3e8 on CUDA, none on the CPU; '' for none)")
    parser.add_argument("--history-sizes", type=_sizes, default=None,
                        help="comma-separated m swept at the largest N in compare (default 5,10,20)")
    parser.add_argument("--m", type=int, default=None, help="history size at every N (default 10; 4 with --smoke)")
    parser.add_argument("--contenders", type=_names, default=None,
                        help="comma-separated contender names to run in compare and memory (default: all); a name "
                             "that does not run on this machine is recorded as unavailable")
    parser.add_argument("--contenders-at", type=_names_at, action="append", default=[], metavar="N=NAMES",
                        help="the contenders at one N instead, e.g. 1e5=mlbfgs-triton,mlbfgs-triton-graph (repeatable)")
    parser.add_argument("--no-report", action="store_true",
                        help="write the JSON only (python -m bench.report makes the plots and RESULTS.md later)")
    parser.add_argument("--memory-budget", type=_bytes, default=None,
                        help="bytes the memory plan may use per case, e.g. 60G (default: 90%% of the free memory "
                             "less a reserve; never more than that)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of step_compare.json and memory.json in --out that this run does not "
                             "measure again (a stage split over several calls)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<machine>/)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, few repeats, every stage once: checks that it runs (--sizes, "
                             "--ours-only-sizes, --history-sizes and --m still choose)")
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
    if args.smoke:
        sizes = args.sizes if args.sizes is not None else list(SMOKE_SIZES)
        ours_only = args.ours_only_sizes if args.ours_only_sizes is not None else list(SMOKE_OURS_ONLY_SIZES)
        history_sizes, default_m = args.history_sizes or [2, 4], args.m or 4
    else:
        default_cap = 1e8 if device.type == "cuda" else 1e7
        sizes = args.sizes if args.sizes is not None else [n for n in SIZES if n <= (args.max_n or default_cap)]
        ours_only = args.ours_only_sizes if args.ours_only_sizes is not None else (
            CUDA_OURS_ONLY_SIZES if device.type == "cuda" else [])
        history_sizes, default_m = args.history_sizes or [5, 10, 20], args.m or 10
    at = dict(pair for pairs in args.contenders_at for pair in pairs.items())
    if args.max_n:
        sizes, ours_only = [n for n in sizes if n <= args.max_n], [n for n in ours_only if n <= args.max_n]
    if not sizes and not ours_only:
        parser.error("no size left to run")
    largest = max(sizes + ours_only)
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    print(f"bench: {machine_stamp(device)['slug']}, N {[f'{n:.0e}' for n in sizes]}, ours only "
          f"{[f'{n:.0e}' for n in ours_only]}, results in {out}", flush=True)
    started = time.perf_counter()
    failures = []
    timings = {}
    for stage in stages:
        t0 = time.perf_counter()
        print(f"[{stage}]", flush=True)
        if stage == "kernels":
            stage_kernels(out, max(sizes or ours_only), args.smoke, args.threads)
        elif stage == "compare":
            from .compare import compare_steps

            previous = _previous(out, "step_compare.json", args.merge)
            data = compare_steps(
                device, sizes, smoke=args.smoke, history_sizes=history_sizes, default_m=default_m,
                ours_only_sizes=ours_only, memory_budget=args.memory_budget,
                checkpoint=lambda partial: _write(out, "step_compare.json", partial, device, previous),
                only=args.contenders, at=at,
            )
            failures += _failures(_write(out, "step_compare.json", data, device, previous))
        elif stage == "memory":
            from .memory import measure_memory

            previous = _previous(out, "memory.json", args.merge)
            data = measure_memory(device, sizes, m=default_m, ours_only_sizes=ours_only,
                                  memory_budget=args.memory_budget, only=args.contenders, at=at)
            failures += _failures(_write(out, "memory.json", data, device, previous))
        elif stage == "audit":
            from .audit import format_audit, run_audit

            audit = run_audit(device, numel=4096 if args.smoke else 1 << 16)
            print(format_audit(audit))
            _write(out, "audit.json", audit, device)
        elif stage == "roofline":
            from . import roofline

            if args.smoke:
                result = roofline.run(device, sizes=[1000, 5000], history_sizes=[2], smoke=True)
            else:
                result = roofline.run(device, sizes=roofline.default_sizes(device, args.max_n))
            roofline.write(result, out, device)
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
            f"CPU run: N up to {largest:.0e}; MLBFGS on the C++ and foreach backends (the Triton interpreter "
            "is far too slow to time); training with fewer epochs than on a GPU (see section 5), 3 seeds; "
            f"{torch.get_num_threads()} torch thread(s)."
        )
    if not args.smoke:
        previous = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
        command = "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:])
        run = {"command": command.strip(), "stages": timings, "elapsed_s": time.perf_counter() - started, "notes": notes}
        if set(stages) != set(STAGES) and previous:  # a partial rerun keeps the record of the full one
            run = {**previous, "partial_reruns": previous.get("partial_reruns", []) + [run]}
        _write(out, "run.json", run, device)
    if args.no_report:
        print(f"bench: {time.perf_counter() - started:.0f} s; results in {out}", flush=True)
    else:
        from .report import make_report

        path = make_report(out)
        print(f"bench: {time.perf_counter() - started:.0f} s; report {path}", flush=True)
    if failures:
        raise SystemExit("bench: failed (rows with an error, see the log above):\n  " + "\n  ".join(failures))
    return out


if __name__ == "__main__":
    main()
