"""``MLBFGS``: stochastic, momentum-smoothed L-BFGS (Niu et al., TMLR 2023) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _foreach
from ._arena import BLOCK_STATE_KEYS, Arena
from ._blocks import arena_layout, validate_blocks_spec

__all__ = ["MLBFGS"]

BACKENDS = ("foreach", "triton")


class MLBFGS(Optimizer):
    r"""Momentum-smoothed, block-diagonal stochastic L-BFGS (mL-BFGS).

    Each step computes ``d = H g`` per block by the two-loop recursion over a
    ring of curvature pairs built every ``update_period`` steps from exponential
    moving averages of the parameters and gradients, normalises ``d`` over the
    group, and applies heavy-ball momentum. The exact math is DESIGN.md section 2.

    Args:
        params: an iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (float or 1-element tensor). Default 0.1.
        momentum: heavy-ball momentum on the update. Default 0.9.
        weight_decay: L2 penalty added to the gradient. Default 0.
        history_size: number of curvature pairs kept per block. Default 10.
        update_period: steps between curvature pairs. Default 50.
        betas: EMA coefficients of the parameters and of the gradients. Default (0.999, 0.999).
        pair_momentum: momentum on the pairs themselves; 0 disables. Default 0.9.
        damping: ``phi`` is capped at ``1 - damping``. Default 0.01.
        sigma_low, sigma_high: Powell damping bounds on ``s.y / s.s``. Default 0.01, 1.5.
        eps: guard for divisions and the curvature test. Default 1e-12.
        normalize: divide ``d`` by its norm over the group once a pair is held. Default True.
        blocks: ``"group"``, ``"tensor"``, a positive int (chunk size) or a list of
            lists of parameters. Default ``"group"``.
        maximize: maximise the objective. Default False.
        foreach: use the ``torch._foreach_*`` backend. Default None (chosen).
        fused: use the fused Triton backend. Default None: chosen when every
            parameter is a CUDA floating tensor and Triton imports.
        capturable: keep every counter on the device so the step can be captured
            in a CUDA graph. Default False. (The fused backend always does.)
        differentiable: not supported (raises).
        backend: ``None`` (chosen from ``fused``/``foreach``), ``"foreach"`` or ``"triton"``.
            With ``TRITON_INTERPRET=1``, ``"triton"`` runs the kernels on CPU tensors.
        history_dtype: storage dtype of the history rings (``None``: the parameter
            dtype; ``torch.bfloat16`` halves their bytes, arithmetic stays in the
            parameter dtype).

    A parameter whose ``.grad`` is None at a step is left untouched. A step whose
    gradient holds a NaN or Inf changes nothing and is counted in
    ``state[...]["blocks"][...]["skipped_steps"]``.

    On the fused backend, the first step re-points the parameters of each group
    and (device, dtype) at slices of one flat buffer (``param.data``, as FSDP does)
    and makes their gradients views of another, which ``zero_grad`` zeroes in
    place; a gradient set to None or replaced is copied in at the next step.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        history_size: int = 10,
        update_period: int = 50,
        betas: tuple[float, float] = (0.999, 0.999),
        pair_momentum: float = 0.9,
        damping: float = 0.01,
        sigma_low: float = 0.01,
        sigma_high: float = 1.5,
        eps: float = 1e-12,
        normalize: bool = True,
        blocks="group",
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        backend: str | None = None,
        history_dtype: torch.dtype | None = None,
    ):
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if differentiable:
            raise RuntimeError("MLBFGS does not support `differentiable`")
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (expected one of {BACKENDS})")
        if backend == "foreach" and fused:
            raise RuntimeError("`fused=True` contradicts `backend='foreach'`")
        if backend == "triton" and foreach:
            raise RuntimeError("`foreach=True` contradicts `backend='triton'`")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            history_size=history_size,
            update_period=update_period,
            betas=tuple(betas),
            pair_momentum=pair_momentum,
            damping=damping,
            sigma_low=sigma_low,
            sigma_high=sigma_high,
            eps=eps,
            normalize=normalize,
            blocks=blocks,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
            backend=backend,
            history_dtype=history_dtype,
        )
        _validate_hyperparameters(defaults)
        self._arenas: dict[int, tuple[tuple, list[Arena]]] = {}
        super().__init__(params, defaults)

    # -- groups -----------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        param_group = dict(param_group)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params
        blocks = param_group.get("blocks", self.defaults["blocks"])
        if isinstance(blocks, (list, tuple)):
            param_group["blocks"] = _blocks_as_indices(blocks, params, "blocks" in param_group)
        # Validate before the group is appended, so a bad group leaves no trace.
        merged = {**self.defaults, **param_group}
        _validate_hyperparameters(merged)
        if merged["backend"] == "triton" or (merged["backend"] is None and merged["fused"]):
            from . import _triton

            _triton.check_supported(params)
        super().add_param_group(param_group)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._arenas = {}
        for group in self.param_groups:
            group.setdefault("backend", None)
            group.setdefault("history_dtype", None)

    # -- checkpoints ------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to the parameter's dtype; block
        # data (int64 counters, float64 Gram matrices, bfloat16 rings) keeps its own.
        saved_blocks = {
            pid: s["blocks"] for pid, s in state_dict["state"].items() if "blocks" in s
        }
        super().load_state_dict(state_dict)
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in saved_blocks:
                self.state[p]["blocks"] = [
                    {key: block[key].to(device=p.device) for key in BLOCK_STATE_KEYS}
                    for block in saved_blocks[pid]
                ]
        self._arenas = {}

    # -- the step ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform a single optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can raise happens before the first write, so a bad
        # gradient in a later group cannot leave an earlier one updated.
        backends = [self._backend(group) for group in self.param_groups]
        for group, backend in zip(self.param_groups, backends):
            if backend != "triton":  # the fused path checks gradients as it binds them
                _check_gradients(group)
        work = []
        for index, (group, backend) in enumerate(zip(self.param_groups, backends)):
            if backend == "triton":
                from . import _triton

                arenas = self._group_arenas(index, group)
                if _triton.prepare_group(arenas, group):
                    work.append((group, arenas, backend))
            elif any(p.grad is not None for p in group["params"]):
                work.append((group, self._group_arenas(index, group), backend))
        for group, arenas, backend in work:
            if backend == "triton":
                from . import _triton

                _triton.step_group(arenas, group)
            else:
                _foreach_step_group(arenas, group)
        return loss

    def _backend(self, group: dict) -> str:
        if group["backend"] is not None:
            return group["backend"]
        if group["fused"]:
            return "triton"
        if group["fused"] is None and not group["foreach"]:
            from . import _triton

            if _triton.chosen_by_default(group["params"]):
                return "triton"
        return "foreach"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients.

        Gradients the fused backend keeps as views of its flat gradient buffer are
        zeroed in place, one fill per arena, whatever ``set_to_none`` says: dropping
        them would cost a gather at the next step. The others follow
        ``torch.optim.Optimizer.zero_grad``."""
        in_place: set[int] = set()
        for _, arenas in self._arenas.values():
            if arenas[0].fused is not None:
                in_place.update(map(id, arenas[0].fused.zero_grad()))
        if not in_place:
            super().zero_grad(set_to_none)
            return
        if len(in_place) == sum(len(group["params"]) for group in self.param_groups):
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or id(p) in in_place:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def _group_arenas(self, index: int, group: dict) -> list[Arena]:
        """The group's arenas, one per (device, dtype), built on first use and
        after a checkpoint is loaded."""
        key = (
            tuple(map(id, group["params"])),
            group["history_size"],
            group["history_dtype"],
            repr(group["blocks"]),
        )
        cached = self._arenas.get(index)
        if cached is not None and cached[0] == key:
            return cached[1]
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(group["params"]):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        arenas = []
        for indices in by_kind.values():
            params = [group["params"][i] for i in indices]
            blocks = group["blocks"]
            if isinstance(blocks, list):
                local = {g: l for l, g in enumerate(indices)}
                blocks = [[local[i] for i in blk if i in local] for blk in blocks]
                blocks = [blk for blk in blocks if blk]
                if sum(len(b) for b in blocks) != len(params):
                    raise ValueError("a block may not mix parameters of different devices or dtypes")
            layout = arena_layout([p.numel() for p in params], blocks)
            arena = Arena(params, layout, group["history_size"], group["history_dtype"])
            arena.adopt(self.state)
            arenas.append(arena)
        self._arenas[index] = (key, arenas)
        return arenas


def _foreach_step_group(arenas: list[Arena], group: dict) -> None:
    steps = [_foreach.GroupStep(arena) for arena in arenas]
    for step in steps:
        _foreach.gather_gradient(step, group["weight_decay"], group["maximize"])
    dots = [_foreach.gradient_dots(arena) for arena in arenas]
    home = arenas[0].device
    ok = torch.stack([torch.isfinite(gg).all().to(home) for _, _, gg in dots]).all()
    d_dot_d = [
        _foreach.direction(arena, ok.to(arena.device), arena_dots)
        for arena, arena_dots in zip(arenas, dots)
    ]
    d_scale = group_direction_scale(arenas, d_dot_d, group["normalize"], home)
    for step, arena in zip(steps, arenas):
        ok_here = ok.to(arena.device)
        _foreach.apply_update(step, group, ok_here, d_scale.to(arena.device, arena.dtype))
        if arena.counter_probe is None:
            arena.counter_probe = _foreach.CounterProbe(arena.device)
        # Under capture the host's knowledge would be frozen into the graph.
        if group["capturable"] or arena.counter_probe.pair_update_possible(group["update_period"]):
            _foreach.push_pairs(arena, group, ok_here)
        if not group["capturable"]:
            arena.counter_probe.record(arena.counters["step"][0])


def group_direction_scale(
    arenas: list[Arena], d_dot_d: list[Tensor], normalize: bool, home: torch.device
) -> Tensor:
    """``1 / ||d||`` over the whole group once any block holds a pair (DESIGN.md
    section 2 step 4), else 1; 1 as well when ``||d|| = 0``."""
    one = torch.ones((), dtype=torch.float64, device=home)
    if not normalize:
        return one
    norm = torch.stack([x.sum().to(home) for x in d_dot_d]).sum().sqrt()
    any_held = torch.stack([(a.counters["pair_count"] > 0).any().to(home) for a in arenas]).any()
    return torch.where(any_held & (norm > 0), one / torch.where(norm > 0, norm, one), one)


# -- validation -------------------------------------------------------------------
def _validate_hyperparameters(group: dict) -> None:
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
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas} (expected two values)")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
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


def _blocks_as_indices(blocks, params: list[Tensor], explicit: bool) -> list[list[int]]:
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


def _check_gradients(group: dict) -> None:
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
