"""Float64, out-of-place implementations that define the math every backend is tested against."""

from .lbfgs import ReferenceLBFGS
from .mlbfgs import ReferenceGroup

__all__ = ["ReferenceGroup", "ReferenceLBFGS"]
