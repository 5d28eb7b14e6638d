"""Packaging for mlbfgs_fused.

The top-level ``kernels/`` folder (Triton kernels) installs as the subpackage
``mlbfgs_fused.kernels``; nothing named plain ``kernels`` lands in site-packages.
"""

from setuptools import find_packages, setup

setup(
    name="mlbfgs_fused",
    version="0.1.0",
    description="Fused, in-place mL-BFGS and L-BFGS optimizers for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["mlbfgs_fused", "mlbfgs_fused.*"]), "mlbfgs_fused.kernels"],
    package_dir={"mlbfgs_fused": "mlbfgs_fused", "mlbfgs_fused.kernels": "kernels"},
    install_requires=["torch"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "triton", "numpy"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
)
