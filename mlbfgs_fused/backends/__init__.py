"""The backends of the optimizers, side by side, the one place that picks one, and the
one place that orders a step's passes.

Every backend module has the same entry points (one signature, like torch's
``_single_tensor_adam`` / ``_multi_tensor_adam`` / ``_fused_adam``):

``available() -> bool``
    whether the backend can run in this process (Triton imports, the C++ extension loaded, ...).
``supported_devices() -> list[str]``
    device types its kernels take.
``check_gradients(group) -> None``
    raise PyTorch's error for a gradient the backend cannot take; called for every
    group before anything of any group is written.
``plan(arenas, group) -> Plan``
    the backend's own objects for one group's arenas (tables, scratch, device-side
    hyperparameters): made once, kept by the optimizer next to the arenas, never in
    them (an :class:`~mlbfgs_fused._state.arena.Arena` holds state and views only).

``lbfgs_plan(arenas, gram, pair_count, maximize, line_search) -> LBFGSPlan``
    the same for :class:`mlbfgs_fused.LBFGS`: one plan over all its arenas (one
    quasi-Newton model), with the passes of :class:`LBFGSPlan`.

A :class:`Plan` runs the passes of a step. They have one name in ``kernels/``,
``csrc/``, every backend, the bench and docs/design.md ("The backend protocol"), and
:func:`run_passes` is the one place that orders them, after the reference's step.
No pass reads a device value on the host or allocates in a steady-state step.
"""

from __future__ import annotations

import functools
import importlib
import warnings
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


class Plan:
    """One group's passes on one backend (docs/design.md, "The backend protocol").

    ``amp`` is an :class:`AmpScaling` or None; ``ok`` maps each device of the group to
    the step's 0-dim bool verdict, where it is False nothing but the skipped-step
    counters may change. A backend may fuse a pass into a neighbour (its docstring
    says which); the order of :func:`run_passes` holds for every backend.
    """

    # Whether :meth:`whole_step` can run the step (the group is one arena of this plan).
    single_call = False

    def whole_step(self, group: dict, amp: AmpScaling | None) -> bool:
        """The whole step of the group in one call, every pass above and the verdict
        ``ok`` included, when the group is the optimizer's only arena (the verdict then
        needs nothing from elsewhere) and nothing changed since the plan was made (the
        same parameter objects, dtypes, shapes and layouts; gradients dense and laid out
        like their parameters). Returns False, having written nothing, where it cannot:
        the optimizer then runs the passes one by one. Only where ``single_call``."""
        return False

    def prepare(self, group: dict) -> bool:
        """Host-side work before any write: bind the gradients, refresh device-side
        hyperparameters. Returns whether any parameter of the group has a gradient."""
        raise NotImplementedError

    def gradient_dots(self, group: dict, amp: AmpScaling | None) -> list[Tensor]:
        """Pass 1: ``S g``, ``Y g``, ``g.g`` per block. Returns one 0-dim float64 probe
        per arena, non-finite exactly when some effective gradient entry of the arena is
        (docs/design.md, "Non-finite steps")."""
        raise NotImplementedError

    def two_loop(self, group: dict, ok: dict, after_push: bool = False) -> None:
        """The coefficients of ``d`` from the Gram matrices and the dots, and the group's
        scale of ``d``. ``after_push``: a pair was just pushed and is used at once
        (``variant="released"``, E4): the dots with it come first."""
        raise NotImplementedError

    def update(self, group: dict, ok: dict, amp: AmpScaling | None, averages: bool = True, direction: bool = True) -> None:
        """Pass 2: the averages of the parameters and gradients (``averages``), then ``d``,
        momentum and the parameters (``direction``)."""
        raise NotImplementedError

    def push(self, group: dict, ok: dict, amp: AmpScaling | None) -> None:
        """Where a pair is due: the pair into its ring slot, its Gram row, the snapshots
        (``variant="released"``: then ``G = g``, E2)."""
        raise NotImplementedError

    def commit(self, group: dict, ok: dict) -> None:
        """The counters: ``step += ok``, ``skipped_steps += not ok``; last, as every other
        pass reads ``step``."""
        raise NotImplementedError


def run_passes(plan: Plan, group: dict, ok: dict, amp: AmpScaling | None) -> None:
    """The rest of a step once ``ok`` is decided, in the order of the reference
    (mlbfgs_fused/reference/mlbfgs.py; docs/design.md, "The step" and "The released
    variant"): the paper's direction comes from the history as it was and the pair
    after the update; the released code's averages and pair come first (E1, E2) and
    the direction uses the new pair (E4)."""
    if group["variant"] == "released":
        plan.update(group, ok, amp, averages=True, direction=False)
        plan.push(group, ok, amp)
        plan.two_loop(group, ok, after_push=True)
        plan.update(group, ok, amp, averages=False, direction=True)
    else:
        plan.two_loop(group, ok)
        plan.update(group, ok, amp)
        plan.push(group, ok, amp)
    plan.commit(group, ok)


class LBFGSPlan:
    """LBFGS's passes over all of its arenas, on one backend (docs/design.md, "LBFGS";
    the layouts they share are in :mod:`._lbfgs`). The optimizer's host loop calls them
    in the order of torch's algorithm; every pass is in place, reads no device value on
    the host and allocates nothing (the foreach plan: small float64 tensors only).

    ``source`` is where the gradient of the current point is (:data:`._lbfgs.SOURCE_GRAD`,
    ``SOURCE_KEPT``, ``SOURCE_PREV``); ``alphas[a]`` turns arena ``a``'s ``direction``
    into the step just taken (``s = alpha d``, the pair candidate's ``s``).
    """

    read: Tensor  # the read vector: the one host read of an evaluation (._lbfgs.READ_*)
    scales: list[float]  # per arena: its group's lr over the first group's

    def bind(self) -> None:
        """After a closure evaluation, before any pass reads the gradients: bring the
        plan up to date with the user's ``.grad`` tensors (a new table only when a
        ``data_ptr`` changed)."""
        raise NotImplementedError

    def gradient_dots(self, source: int, alphas: list[float], pair: bool, ring: bool, gd: bool = False,
                      l1: bool = False) -> None:
        """The gradient's dots with the ring (``ring``) and with the pair candidate
        (``pair``), ``g.g`` and ``max |g|``, with ``gd`` ``g . d`` (a line-search trial), with
        ``l1`` ``|g|_1`` (the first iteration's step): partial sums per piece. The read
        vector's entries not asked for hold whatever they held."""
        raise NotImplementedError

    def two_loop(self, loss: Tensor | None, pair: bool, direction: bool) -> None:
        """The partial sums summed; the read vector (``loss``, a tensor on the first
        arena's device, or None); with ``direction``, the pair's acceptance, the
        candidate Gram matrices and the coefficients of ``d = -H g`` with their ``g . d``.
        The state is not changed."""
        raise NotImplementedError

    def push(self, source: int, alphas: list[float]) -> None:
        """The accepted pair into its ring slot; the candidate Gram matrices and pair
        count into the state."""
        raise NotImplementedError

    def direction(self, source: int, alphas: list[float], moves: list[float] | None, save: bool,
                  push: bool) -> None:
        """``d`` from the coefficients, ``prev_grad = g``; with ``push`` the pair is pushed
        first (fused plans: in the same pass); with ``save`` the parameters are copied to
        the saved point; with ``moves`` they step to ``x + moves[a] d``."""
        raise NotImplementedError

    def move(self, alphas: list[float], from_saved: bool) -> None:
        """The parameters to ``saved + alphas[a] d`` (``from_saved``) or ``x + alphas[a] d``."""
        raise NotImplementedError

    def keep(self) -> None:
        """The current gradient copied aside (``SOURCE_KEPT``)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Backend:
    """One registered backend: its name, where its entry points live (a module, or an
    object in one: ``".native:cpp"``), and whether ``fused=True`` can mean it."""

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
            path, _, attribute = self.module_path.partition(":")
            module = importlib.import_module(path, __name__)
            module = _MODULES[self.name] = getattr(module, attribute) if attribute else module
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
        Backend("cpp", ".native:cpp", fused=True),
        Backend("cuda", ".native:cuda", fused=True),
    )
}

# What ``fused=True`` means per device type, in order of preference (the first
# available one): on the CPU the C++ kernels, as for torch's fused AdamW; on CUDA
# Triton where it imports, else the CUDA C++ kernels.
FUSED_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}

# What ``fused=None`` (and ``foreach`` not set) picks per device type: the fastest
# available backend as measured by ``python -m bench.run --only compare`` (one CPU
# thread: see bench/results/); foreach where none of these is available.
DEFAULT_PREFERENCE = {"cpu": ("cpp",), "cuda": ("triton", "cuda")}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Backend:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {names()})") from None


def select(group: dict) -> Backend:
    """The backend that steps ``group``: ``backend=`` when named, else from
    ``fused``/``foreach`` as ``torch.optim`` decides (``_default_to_fused_or_foreach``)."""
    if group["backend"] is not None:
        backend = get(group["backend"])
        if not backend.available():
            reason = getattr(backend.module, "unavailable_reason", lambda: None)()
            usable = [name for name, b in REGISTRY.items() if b.available()]
            raise RuntimeError(
                f"backend={backend.name!r} is not available here"
                + (f" ({reason})" if reason else "")
                + f"; the available backends are {usable}"
            )
        return backend
    params = stepped_params(group)
    if group["fused"]:
        return _fused_for(params)
    if group["fused"] is None and not group["foreach"]:
        device = _device_type(params)
        for name in DEFAULT_PREFERENCE.get(device, ()):
            backend = REGISTRY[name]
            if backend.available():
                return backend
            if name == "cpp":
                _warn_unavailable(backend)
    return REGISTRY["foreach"]


def stepped_params(group: dict) -> list:
    """The parameters a backend is chosen and checked for: those with a gradient, as
    torch checks ``fused=True`` (a parameter without one is not stepped), or all of them
    while none has one (at construction)."""
    with_grad = [p for p in group["params"] if p.grad is not None]
    return with_grad or list(group["params"])


def check_devices(params, backend: Backend) -> None:
    """Raise unless every parameter lives on a device type the backend's kernels take."""
    devices = backend.supported_devices()
    for p in params:
        if p.device.type not in devices:
            raise RuntimeError(
                f"the {backend.name!r} backend takes tensors on {devices}, got a parameter on "
                f"{p.device}; move the model or choose another backend"
            )


def _device_type(params) -> str | None:
    """The device type every parameter shares, or None."""
    kinds = {"cuda" if p.is_cuda else getattr(getattr(p, "device", None), "type", "cpu") for p in params}
    return kinds.pop() if len(kinds) == 1 else None


def _fused_for(params) -> Backend:
    """``fused=True``: the first available fused backend for the parameters' device,
    or PyTorch's error naming the device types a fused backend takes (checked when the
    step runs, as torch checks it, so an optimizer of meta parameters is built before
    ``model.to_empty(...)``)."""
    devices = list(FUSED_PREFERENCE)
    for p in params:
        device = "cuda" if p.is_cuda else p.device.type
        if not (device in devices and torch.is_floating_point(p)):
            raise RuntimeError(
                "`fused=True` requires all the params to be floating point Tensors of "
                f"supported devices: {devices} but {p.dtype} and {p.device.type}"
            )
    device = _device_type(params)
    if device is None:
        raise RuntimeError(
            "`fused=True` requires the params of a parameter group to be on one device type, "
            f"got {sorted({p.device.type for p in params})}; use foreach=True or separate groups"
        )
    for name in FUSED_PREFERENCE[device]:
        backend = REGISTRY[name]
        if backend.available() and device in backend.supported_devices():
            return backend
    names = " or ".join(repr(n) for n in FUSED_PREFERENCE[device])
    raise RuntimeError(f"`fused=True` on {device} needs the {names} backend, which is not available here")


@functools.cache
def _warn_unavailable(backend: Backend) -> None:
    """Once per process: the default backend for the device could not be used."""
    reason = getattr(backend.module, "unavailable_reason", lambda: None)()
    warnings.warn(
        f"mlbfgs_fused: the {backend.name!r} backend is not available ({reason}); "
        "falling back to 'foreach'. Reinstall with a C++ compiler "
        "(pip install --no-build-isolation .) to build it.",
        stacklevel=3,
    )
