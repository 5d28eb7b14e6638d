"""Float64, out-of-place implementations that define the math every backend is tested against."""

from .mlbfgs import ReferenceGroup

__all__ = ["ReferenceGroup"]
