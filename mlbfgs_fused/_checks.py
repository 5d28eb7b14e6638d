"""Argument and gradient checks shared by the optimizers, in PyTorch's wording.

Everything here raises before the optimizer writes anything, so a bad group or
gradient never leaves an optimizer half-updated.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from ._math import NORMALIZE_VALUES
from ._state.layout import validate_blocks_spec

# The storage dtypes of parameters and history rings every backend takes, in any pair
# but a float64 ring under narrower parameters (docs/design.md, "Half precision").
HISTORY_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

# "paper": the math of Niu et al. (docs/design.md); "released": the authors' released code's
# averaging and pair timing (see MLBFGS's docstring).
VARIANTS = ("paper", "released")


def _number(group: dict, key: str, what: str, integer: bool = False, expected: str | None = None):
    """``group[key]`` if it is a real number (an int when ``integer``); a bool is not one."""
    value = group[key]
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        expected = expected or ("an int" if integer else "a float")
        raise TypeError(f"{what}: {value!r} ({key} must be {expected}, got {type(value).__name__})")
    return value


def validate_hyperparameters(group: dict) -> None:
    """Raise PyTorch's error for a bad hyperparameter: ``TypeError`` for a value of
    the wrong type (a string, a bool where a number is expected), ``ValueError``
    for one out of range, both naming the key; ``RuntimeError`` for flags that
    contradict each other, in torch's wording."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not lr.is_floating_point():
            raise TypeError(f"Invalid learning rate: {lr!r} (a Tensor lr must be floating point)")
    elif not 0.0 <= _number(group, "lr", "Invalid learning rate", expected="a float or a 1-element Tensor"):
        raise ValueError(f"Invalid learning rate: {lr}")
    checks = [
        ("momentum", "Invalid momentum value", lambda v: 0.0 <= v < 1.0),
        ("weight_decay", "Invalid weight_decay value", lambda v: 0.0 <= v),
        ("pair_momentum", "Invalid pair_momentum value", lambda v: 0.0 <= v < 1.0),
        ("damping", "Invalid damping value", lambda v: 0.0 <= v < 1.0),
        ("sigma_low", "Invalid sigma_low value", lambda v: 0.0 <= v < 1.0),
        ("sigma_high", "Invalid sigma_high value", lambda v: v > 1.0),
        ("eps", "Invalid epsilon value", lambda v: 0.0 <= v),
    ]
    for key, message, valid in checks:
        if not valid(_number(group, key, message)):
            raise ValueError(f"{message}: {group[key]}")
    for key in ("history_size", "update_period"):
        if _number(group, key, f"Invalid {key} value", integer=True) < 1:
            raise ValueError(f"Invalid {key} value: {group[key]}")
    ema_decay = group["ema_decay"]
    if isinstance(ema_decay, (str, bytes)) or not isinstance(ema_decay, Sequence):
        raise TypeError(f"Invalid ema_decay: {ema_decay!r} (expected a pair of floats)")
    if len(ema_decay) != 2:
        raise ValueError(f"Invalid ema_decay: {ema_decay} (expected two values)")
    for i, beta in enumerate(ema_decay):
        message = f"Invalid ema_decay value at index {i}"
        if not 0.0 <= _number({"ema_decay": beta}, "ema_decay", message) < 1.0:
            raise ValueError(f"{message}: {beta}")
    if group["variant"] not in VARIANTS:
        raise ValueError(f"Invalid variant: {group['variant']!r} (expected one of {VARIANTS})")
    normalize = group["normalize"]
    if not isinstance(normalize, (bool, str)):
        raise TypeError(f"Invalid normalize value: {normalize!r} (normalize must be 'always', True or False)")
    if normalize not in NORMALIZE_VALUES:
        raise ValueError(f"Invalid normalize value: {normalize!r} (expected 'always', True or False)")
    for key in ("maximize", "capturable", "differentiable"):
        if not isinstance(group[key], bool):
            raise TypeError(f"Invalid {key} value: {group[key]!r} ({key} must be a bool)")
    for key in ("foreach", "fused"):
        if group[key] is not None and not isinstance(group[key], bool):
            raise TypeError(f"Invalid {key} value: {group[key]!r} ({key} must be a bool or None)")
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group["fused"] and group["differentiable"]:
        raise RuntimeError("`fused` does not support `differentiable`")
    if group["differentiable"]:
        raise RuntimeError("MLBFGS does not support `differentiable`")
    history_dtype = group["history_dtype"]
    if history_dtype is not None and history_dtype not in HISTORY_DTYPES:
        raise ValueError(
            f"Invalid history_dtype: {history_dtype} (expected None, the parameters' dtype, "
            f"or one of {list(HISTORY_DTYPES)})"
        )
    validate_blocks_spec(group["blocks"])
    check_parameters(group.get("params", []), history_dtype)


# torch's own error for an in-place write to a tensor whose elements share memory.
_OVERLAP = (
    "unsupported operation: more than one element of the written-to tensor refers to a "
    "single memory location. Please clone() the tensor before performing the operation."
)


def check_parameters(params, history_dtype: torch.dtype | None = None) -> None:
    """Raise for a parameter MLBFGS cannot step: not one of the floating dtypes it takes,
    one whose history would be stored wider than float32 arithmetic carries, or one
    whose elements share memory (an ``expand``-ed tensor), which no in-place write may
    touch. Checked at construction and whenever a parameter's layout changes."""
    for p in params:
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"MLBFGS can only optimize floating point Tensors, got {p.dtype}")
        if p.is_complex():
            raise ValueError("MLBFGS does not support complex parameters")
        if p.dtype not in HISTORY_DTYPES:
            raise ValueError(f"MLBFGS optimizes parameters of dtypes {list(HISTORY_DTYPES)}, got {p.dtype}")
        if history_dtype == torch.float64 and p.dtype != torch.float64:
            raise ValueError(
                f"Invalid history_dtype: {history_dtype} for {p.dtype} parameters (their "
                "arithmetic runs in float32: a float64 history would store nothing more)"
            )
        if p.device.type != "meta" and torch._debug_has_internal_overlap(p) == 1:
            raise RuntimeError(f"MLBFGS: a parameter of shape {tuple(p.shape)} with strides {p.stride()}: {_OVERLAP}")


def drop_duplicates(group: dict) -> None:
    """A parameter listed twice in one group is kept once (its first place), with its
    name: torch warns for it ("will cause an error") and would step it twice; MLBFGS
    keeps one state per parameter and steps it once."""
    seen: set[int] = set()
    keep = [i for i, p in enumerate(group["params"]) if not (id(p) in seen or seen.add(id(p)))]
    if len(keep) == len(group["params"]):
        return
    group["params"] = [group["params"][i] for i in keep]
    if "param_names" in group:
        group["param_names"] = [group["param_names"][i] for i in keep]


def blocks_as_indices(
    blocks, params: list[Tensor], explicit: bool, names: list[str] | None = None
) -> list[list[int]]:
    """Turn a list of lists of parameters into lists of indices into ``params``.

    A block names its parameters by the tensors themselves, by index (a group
    restored from a state_dict), or, in a group built from ``named_parameters()``,
    by name. The constructor's ``blocks`` may name parameters of every group; each
    group keeps the lists' members that belong to it. A group's own ``blocks`` must
    name its parameters exactly."""
    position = {id(p): i for i, p in enumerate(params)}
    by_name = {name: i for i, name in enumerate(names or ())}
    result = []
    for block in blocks:
        if isinstance(block, (str, bytes)) or not isinstance(block, (list, tuple)):
            raise ValueError("blocks given as a list must be a list of lists of parameters")
        indices = []
        for p in block:
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                p = p[1]  # a (name, parameter) pair, as named_parameters() yields
            if isinstance(p, bool):
                raise ValueError(f"blocks name a parameter by {p!r}")
            if isinstance(p, int):
                indices.append(p)
            elif isinstance(p, str):
                if p in by_name:
                    indices.append(by_name[p])
                elif explicit or names is None:
                    raise ValueError(f"blocks name a parameter {p!r} that is not in the group")
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
    """Raise for a gradient no backend reads correctly: sparse, complex, or not of its
    parameter's shape, dtype or device (autograd never makes one; ``p.grad.data = ...``
    can)."""
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("MLBFGS does not support sparse gradients")
        if grad.is_complex():
            raise RuntimeError("MLBFGS does not support complex gradients")
        check_gradient_layout(p, grad, "MLBFGS")


def check_gradient_layout(p: Tensor, grad: Tensor, owner: str) -> None:
    """Raise for a gradient not of its parameter's shape, dtype or device (what every
    backend of ``owner`` reads a gradient as)."""
    if grad.shape != p.shape:
        raise RuntimeError(
            f"gradient has shape {tuple(grad.shape)} but the parameter has shape {tuple(p.shape)}"
        )
    if grad.dtype != p.dtype:
        raise RuntimeError(
            f"assigned grad has data of a different type ({grad.dtype}) than its parameter "
            f"({p.dtype}); {owner} reads a gradient in its parameter's dtype: assign "
            "p.grad = p.grad.to(p.dtype)"
        )
    if grad.device != p.device:
        raise RuntimeError(
            f"assigned grad has data located on a different device ({grad.device}) than "
            f"its parameter ({p.device}); move it with p.grad = p.grad.to(p.device)"
        )
