"""Triton kernels of the fused backend (installed as ``mlbfgs_fused.kernels``).

Importing this package does not import Triton; each kernel module does.
"""
