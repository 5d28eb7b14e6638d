"""Fused, in-place quasi-Newton optimizers for PyTorch."""

from .lbfgs import LBFGS
from .mlbfgs import MLBFGS

__all__ = ["LBFGS", "MLBFGS"]
__version__ = "0.1.0"
