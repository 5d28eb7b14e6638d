"""The CUDA C++ kernels of csrc/cuda compile with nvcc (object files: a CPU build of
torch cannot link them), so they never rot on machines without a GPU. Their
runtime tests are in test_native.py and run where a GPU is."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _nvcc() -> str | None:
    for candidate in (
        os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
        "/usr/local/cuda-13.0/bin/nvcc",
        shutil.which("nvcc"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


NVCC = _nvcc()

pytestmark = [pytest.mark.slow, pytest.mark.skipif(NVCC is None, reason="needs nvcc")]


def test_every_pass_has_a_source():
    assert {p.stem for p in SOURCES} == {
        "gradient_dots", "two_loop", "update", "push",  # MLBFGS
        "lbfgs_gradient_dots", "lbfgs_two_loop", "lbfgs_direction",  # LBFGS (lbfgs_move with the direction)
    }


@pytest.mark.parametrize("arch", ["sm_90"])
def test_cuda_sources_compile(tmp_path, arch):
    """All passes in one translation unit (torch's headers are parsed once: a third of
    the time of one nvcc call per source)."""
    unit = tmp_path / "passes.cu"
    unit.write_text("".join(f'#include "{source}"\n' for source in SOURCES))
    flags = [
        "-std=c++20", f"-arch={arch}", "--expt-relaxed-constexpr",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-I", str(ROOT / "csrc"),
        *[arg for path in include_paths() for arg in ("-I", path)],
        "-Xcudafe", "--diag_suppress=3306",  # torch's C++20 bit-field initialisers
    ]
    out = tmp_path / "passes.o"
    result = subprocess.run([NVCC, "-c", str(unit), "-o", str(out), *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert out.stat().st_size > 0
