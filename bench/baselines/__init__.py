"""Peers that the benchmarks compare MLBFGS with, written here so that they run
side by side with it in one process on the same parameters and gradients.

- :class:`AuthorsStyleMLBFGS`: the step of the authors' released mL-BFGS code, its
  math (``MLBFGS(variant="released")``) and its implementation style (flattening
  copies, cloned gradients, Python lists, a host sync per two-loop iteration, SGD
  momentum on ``.grad``).
- :class:`TorchLBFGSDirection`: the per-iteration work of ``torch.optim.LBFGS``
  (fixed step, no line search), line for line from ``torch/optim/lbfgs.py``.
"""

from .authors_mlbfgs import AuthorsStyleMLBFGS
from .torch_lbfgs import TorchLBFGSDirection

__all__ = ["AuthorsStyleMLBFGS", "TorchLBFGSDirection"]
