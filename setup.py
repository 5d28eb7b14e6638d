"""Packaging for mlbfgs_fused.

The top-level ``kernels/`` folder (Triton kernels) installs as the subpackage
``mlbfgs_fused.kernels``; nothing named plain ``kernels`` lands in site-packages.

The C++ CPU kernels in ``csrc/`` build as the extension ``mlbfgs_fused._C``
against the torch already installed (install with ``--no-build-isolation``: an
isolated build would fetch its own torch). Without torch or a working compiler
the package still installs, without the extension; the ``"cpp"`` backend then
reports itself unavailable. ``MLBFGS_NO_EXTENSION=1`` skips the build.
"""

import os
import platform
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

CPU_SOURCES = ["csrc/ops.cpp", "csrc/cpu/passes.cpp", "csrc/cpu/lbfgs.cpp", "csrc/python.cpp"]
CUDA_SOURCES = [f"csrc/cuda/{name}.cu" for name in ("gradient_dots", "two_loop", "update", "push")] + [
    f"csrc/cuda/lbfgs_{name}.cu" for name in ("gradient_dots", "two_loop", "direction")
]


def extensions():
    if os.environ.get("MLBFGS_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("mlbfgs_fused: torch is not importable; installing without the C++ kernels", file=sys.stderr)
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Build with ninja; if the compiler fails, install without the extension."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # no compiler, missing headers, ...
                print(
                    f"mlbfgs_fused: the C++ kernels did not build ({error}); installing without them",
                    file=sys.stderr,
                )
                self.extensions = []

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:
                print(
                    f"mlbfgs_fused: the C++ kernels did not build ({error}); installing without them",
                    file=sys.stderr,
                )

    common = dict(
        include_dirs=[os.path.abspath("csrc")],
    )
    if _with_cuda():
        from torch.utils.cpp_extension import CUDAExtension

        ext = CUDAExtension(
            "mlbfgs_fused._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": ["-O3", *_cpu_flags()], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            **common,
        )
    else:
        ext = CppExtension("mlbfgs_fused._C", CPU_SOURCES, extra_compile_args=["-O3", *_cpu_flags()], **common)
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


def _cpu_flags() -> list[str]:
    """AVX2, FMA and F16C (``at::vec::Vectorized``'s AVX2 implementation) when the building
    machine has them, as the extension is built where it runs; MLBFGS_NO_AVX2=1 keeps
    the portable baseline (what a wheel for other machines needs)."""
    if os.environ.get("MLBFGS_NO_AVX2") == "1" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags):  # what torch's own AVX2 kernels are built with
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _with_cuda() -> bool:
    """The CUDA kernels build with a CUDA torch and nvcc (MLBFGS_NO_CUDA=1 skips them)."""
    if os.environ.get("MLBFGS_NO_CUDA") == "1":
        return False
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cuda_runtime.h")):
        # torch guesses the toolkit from `which nvcc`; an nvcc on PATH that is a wrapper
        # script (/usr/local/bin/nvcc) makes that /usr/local, without CUDA's headers and
        # libraries. The usual install location is where they are.
        fallback = "/usr/local/cuda"
        if not os.path.exists(os.path.join(fallback, "include", "cuda_runtime.h")):
            return False
        print(f"mlbfgs_fused: CUDA_HOME={cpp_extension.CUDA_HOME} holds no CUDA headers; using {fallback}",
              file=sys.stderr)
        cpp_extension.CUDA_HOME = fallback
    return True


ext_modules, cmdclass = extensions()

setup(
    name="mlbfgs_fused",
    version="0.1.0",
    description="Fused, in-place mL-BFGS and L-BFGS optimizers for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["mlbfgs_fused", "mlbfgs_fused.*"]), "mlbfgs_fused.kernels"],
    package_dir={"mlbfgs_fused": "mlbfgs_fused", "mlbfgs_fused.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton", "numpy", "scipy", "scikit-learn"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
)
