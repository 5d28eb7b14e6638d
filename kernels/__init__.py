"""Triton kernels of the fused backend (installed as ``mlbfgs_fused.kernels``).

A step of one arena is five launches, in this order: :mod:`.gradient_dots` (pass 1:
inner products of the gradient with the history, and the candidate pair's sums on a
pair-forming step), :mod:`.two_loop` (the two-loop recursion on the Gram matrices,
the pair's damping and acceptance, the finiteness probe), :mod:`.update` (pass 2:
direction, averages, momentum, parameters), then :mod:`.push`'s two: the curvature
pair, when one is due, and the commit of the counters and the Gram row. The first
two run before the optimizer combines the probes into the step's ``ok``; the last
three read it. :mod:`.common` holds the geometry, the shared device helpers and the
launch registration. Each module's docstring states its bytes and launches;
``mlbfgs_fused.backends.triton`` drives them.

Importing this package does not import Triton; each kernel module does.
"""
