"""Float64, out-of-place implementations that define the math every backend is tested against."""

from .lbfgs import ReferenceLBFGS
from .lbfgsb import LBFGSBResult, minimize_lbfgsb
from .mlbfgs import ReferenceGroup

__all__ = ["LBFGSBResult", "ReferenceGroup", "ReferenceLBFGS", "minimize_lbfgsb"]
