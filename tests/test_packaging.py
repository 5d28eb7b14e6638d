"""The package layout: kernels/ installs as mlbfgs_fused.kernels and nothing else."""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_imports():
    kernels = importlib.import_module("mlbfgs_fused.kernels")
    assert Path(kernels.__file__).resolve().parent == (ROOT / "kernels").resolve() or "site-packages" in kernels.__file__


def test_plain_kernels_is_not_importable():
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kernels') is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


@pytest.mark.slow
def test_wheel_maps_kernels_under_the_package(tmp_path):
    """``pip install .`` must ship kernels/ as mlbfgs_fused/kernels/ and no top-level ``kernels``."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("mlbfgs_fused-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mlbfgs_fused/kernels/__init__.py" in names
    assert "mlbfgs_fused/reference/mlbfgs.py" in names
    top_level = {n.split("/")[0] for n in names}
    assert "kernels" not in top_level and "tests" not in top_level and "bench" not in top_level
