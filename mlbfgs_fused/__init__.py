"""Fused, in-place quasi-Newton optimizers for PyTorch."""

from .mlbfgs import MLBFGS

__all__ = ["MLBFGS"]
__version__ = "0.1.0"
