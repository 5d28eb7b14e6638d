"""Argument and gradient checks shared by the optimizers, in PyTorch's wording.

Everything here raises before the optimizer writes anything, so a bad group or
gradient never leaves an optimizer half-updated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._state.layout import validate_blocks_spec

# "paper": the math of Niu et al. (docs/design.md); "released": the authors' released code's
# averaging and pair timing (see MLBFGS's docstring).
VARIANTS = ("paper", "released")


def validate_hyperparameters(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    checks = [
        ("momentum", 0.0 <= group["momentum"] < 1.0, "Invalid momentum value"),
        ("weight_decay", 0.0 <= group["weight_decay"], "Invalid weight_decay value"),
        ("pair_momentum", 0.0 <= group["pair_momentum"] < 1.0, "Invalid pair_momentum value"),
        ("damping", 0.0 <= group["damping"] < 1.0, "Invalid damping value"),
        ("sigma_low", 0.0 <= group["sigma_low"] < 1.0, "Invalid sigma_low value"),
        ("sigma_high", group["sigma_high"] > 1.0, "Invalid sigma_high value"),
        ("eps", 0.0 <= group["eps"], "Invalid epsilon value"),
    ]
    for key, valid, message in checks:
        if not valid:
            raise ValueError(f"{message}: {group[key]}")
    for key in ("history_size", "update_period"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {key} value: {value}")
    ema_decay = group["ema_decay"]
    if len(ema_decay) != 2:
        raise ValueError(f"Invalid ema_decay: {ema_decay} (expected two values)")
    for i, beta in enumerate(ema_decay):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid ema_decay value at index {i}: {beta}")
    if group["variant"] not in VARIANTS:
        raise ValueError(f"Invalid variant: {group['variant']!r} (expected one of {VARIANTS})")
    if not isinstance(group["normalize"], bool):
        raise ValueError(f"Invalid normalize value: {group['normalize']}")
    history_dtype = group["history_dtype"]
    if history_dtype is not None and not (
        isinstance(history_dtype, torch.dtype) and history_dtype.is_floating_point
    ):
        raise ValueError(f"Invalid history_dtype: {history_dtype}")
    validate_blocks_spec(group["blocks"])
    for p in group.get("params", []):
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"MLBFGS can only optimize floating point Tensors, got {p.dtype}")
        if p.is_complex():
            raise ValueError("MLBFGS does not support complex parameters")


def blocks_as_indices(blocks, params: list[Tensor], explicit: bool) -> list[list[int]]:
    """Turn a list of lists of parameters into lists of indices into ``params``.

    The constructor's ``blocks`` may name parameters of every group; each group
    keeps the lists' members that belong to it. A group's own ``blocks`` must
    name its parameters exactly."""
    position = {id(p): i for i, p in enumerate(params)}
    result = []
    for block in blocks:
        if not isinstance(block, (list, tuple)):
            raise ValueError("blocks given as a list must be a list of lists of parameters")
        indices = []
        for p in block:
            if isinstance(p, int) and not isinstance(p, bool):
                indices.append(p)  # already an index (a group restored from a state_dict)
            elif id(p) in position:
                indices.append(position[id(p)])
            elif explicit:
                raise ValueError("blocks name a parameter that is not in the group")
        if indices:
            result.append(indices)
    if sorted(i for b in result for i in b) != list(range(len(params))):
        raise ValueError("blocks given as lists must name every parameter of the group exactly once")
    return result


def check_gradients(group: dict) -> None:
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("MLBFGS does not support sparse gradients")
        if grad.is_complex():
            raise RuntimeError("MLBFGS does not support complex gradients")
        if grad.shape != p.shape:
            raise RuntimeError(
                f"gradient has shape {tuple(grad.shape)} but the parameter has shape {tuple(p.shape)}"
            )
