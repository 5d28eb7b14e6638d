"""Which machine a result comes from, and where its results are written.

Every JSON file of a run carries :func:`machine_stamp`; the results folder is
named by :func:`machine_slug` (GPU name on CUDA, CPU model and core count otherwise).
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug(device: torch.device | None = None) -> str:
    device = device or default_device()
    if device.type == "cuda":
        return _slugify(torch.cuda.get_device_name(device))
    return f"cpu-{_slugify(cpu_model())}-{cpu_count()}c"


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=False
        ).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    # Uncommitted changes to the code measured (results being written are not code).
    dirty = bool(git("status", "--porcelain", "--", "mlbfgs_fused", "kernels", "csrc", "bench", ":(exclude)bench/results"))
    return {"commit": commit, "dirty": dirty}


def machine_stamp(device: torch.device | None = None) -> dict:
    device = device or default_device()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    stamp = {
        "slug": machine_slug(device),
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_commit(),
    }
    return stamp


def results_dir(device: torch.device | None = None, root: Path | None = None) -> Path:
    path = (root or RESULTS_DIR) / machine_slug(device)
    path.mkdir(parents=True, exist_ok=True)
    return path
