"""CMakeLists.txt builds the ops as a shared library against libtorch; loaded with
``torch.ops.load_library`` it runs the C++ backend's step."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler"),
    # A CUDA libtorch makes find_package(Torch) look for the whole CUDA toolkit (FindCUDA,
    # nvrtc, the GPU's architecture); this test checks the CPU library, as CI builds it.
    pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU library, against a CPU build of torch"),
]

STEP = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    from mlbfgs_fused import MLBFGS
    from mlbfgs_fused.backends import native
    p = torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opts = [MLBFGS([x], history_size=2, update_period=2, backend=b) for x, b in ((p, "cpp"), (q, "foreach"))]
    for step in range(7):
        g = torch.randn(5000, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    import mlbfgs_fused
    assert not any(name == "mlbfgs_fused._C" for name in sys.modules), "used the pip extension"
    torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert int(opts[0].block_states(p)[0]["pair_count"]) == 2
    print("ok")
    """
)


def test_cmake_builds_and_loads(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        "-DCMAKE_CUDA_COMPILER=",  # the CPU library only: the CPU wheel has no CUDA to link
    ]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    subprocess.run(configure, check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True, text=True)
    (library,) = build.glob("libmlbfgs_fused_ops.*")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", STEP, str(library)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
