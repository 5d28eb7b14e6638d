"""The backends of the optimizers, side by side, and the one place that picks one.

Every backend module has the same entry points (one signature, like torch's
``_single_tensor_adam`` / ``_multi_tensor_adam`` / ``_fused_adam``):

``available() -> bool``
    whether the backend can run in this process (Triton imports, the C++ extension loaded, ...).
``supported_devices() -> list[str]``
    device types its kernels take.
``check_gradients(group) -> None``
    raise PyTorch's error for a gradient the backend cannot take; called for every
    group before anything of any group is written.
``prepare(arenas, group) -> bool``
    host-side work of a step before anything is written: check and bind the
    gradients, refresh device-side hyperparameters. Raises on bad input. Returns
    whether any parameter of the group has a gradient (a group with none is not stepped).
``gradient_dots(arenas, group, amp) -> list[Tensor]``
    pass 1 (``S g``, ``Y g``, ``g.g`` per block, into the backend's scratch). Returns one
    0-dim float64 tensor per arena (on the arena's device) that is non-finite exactly
    when some effective gradient entry of the arena is: the optimizer combines them over
    every group and device into the step's ``ok`` flag (docs/design.md, "Non-finite steps").
``finish(arenas, group, ok, amp) -> None``
    the rest of the step: direction, update, pair push, counters. ``ok`` maps each
    device of the group to a 0-dim bool tensor; where it is False nothing but the
    skipped-step counters changes.

``amp`` is an :class:`AmpScaling` (``GradScaler``'s ``grad_scale`` and ``found_inf``) or None.
No entry point reads a device value on the host or allocates in a steady-state step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AmpScaling:
    """What ``torch.amp.GradScaler.step`` hands an optimizer that sets
    ``_step_supports_amp_scaling``: the scale the gradients still carry (None when
    the user already called ``unscale_``) and the sum over devices of its inf checks."""

    grad_scale: Tensor | None
    found_inf: Tensor | None


@dataclass(frozen=True)
class Backend:
    """One registered backend: its name, its module, and whether ``fused=True`` means it."""

    name: str
    module_path: str
    fused: bool

    def __post_init__(self):
        if not self.module_path.startswith("."):
            raise ValueError(f"backend module path must be relative, got {self.module_path!r}")

    @property
    def module(self):
        # A dict lookup once imported, which torch.compile traces (importlib it does not).
        module = _MODULES.get(self.name)
        if module is None:
            module = _MODULES[self.name] = importlib.import_module(self.module_path, __name__)
        return module

    def available(self) -> bool:
        return self.module.available()

    def supported_devices(self) -> list[str]:
        return self.module.supported_devices()


_MODULES: dict[str, object] = {}  # backend name -> its imported module

REGISTRY: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend("foreach", ".foreach", fused=False),
        Backend("triton", ".triton", fused=True),
    )
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {names()})") from None


def check_fused_supported(params, backend: Backend) -> None:
    """Raise PyTorch's error for ``fused=True`` on parameters the backend cannot take."""
    devices = backend.supported_devices()
    for p in params:
        if not (p.device.type in devices and torch.is_floating_point(p)):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of "
                f"supported devices: {devices} but {p.dtype} and {p.device.type}"
            )
    if not backend.available():
        raise RuntimeError(f"`fused=True` needs the {backend.name} backend, which is not available here")


def select(group: dict) -> Backend:
    """The backend that steps ``group``: ``backend=`` when named, else from
    ``fused``/``foreach`` as ``torch.optim`` decides (``_default_to_fused_or_foreach``)."""
    if group["backend"] is not None:
        return get(group["backend"])
    params = group["params"]
    if group["fused"]:
        return _fused_for(params)
    if group["fused"] is None and not group["foreach"]:
        triton = REGISTRY["triton"]
        if params and all(p.is_cuda for p in params) and triton.available():
            return triton
    return REGISTRY["foreach"]


def _fused_for(params) -> Backend:
    """``fused=True``: the fused backend whose devices cover the parameters."""
    fused = [b for b in REGISTRY.values() if b.fused]
    for backend in fused:
        if backend.available() and all(p.device.type in backend.supported_devices() for p in params):
            return backend
    return fused[0]  # its check raises PyTorch's error naming the supported devices
