import os

# Triton kernels run on the CPU through the interpreter when there is no GPU.
# It must be set before any kernel is defined, i.e. before mlbfgs_fused.kernels
# modules are imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
