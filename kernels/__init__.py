"""Triton kernels of the fused backend (installed as ``mlbfgs_fused.kernels``).

A step of one arena is five launches, in this order: :mod:`.pass1` (inner
products of the gradient with the history), :mod:`.coefficients` (the two-loop
recursion on the Gram matrices), :mod:`.pass2` (direction, EMAs, momentum,
parameters), then :mod:`.push`'s two: the curvature pair, when one is due, and
the commit of the counters and the Gram row. :mod:`.common` holds the geometry, the shared device helpers and the
launch registration. Each module's docstring states its bytes and launches;
``mlbfgs_fused._triton`` drives them.

Importing this package does not import Triton; each kernel module does.
"""
