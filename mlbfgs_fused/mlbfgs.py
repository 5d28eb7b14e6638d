"""``MLBFGS``: stochastic, momentum-smoothed L-BFGS (Niu et al., TMLR 2023) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from ._checks import blocks_as_indices, check_parameters, drop_duplicates, validate_hyperparameters
from ._state.arena import BLOCK_COUNTER_DTYPES, BLOCK_STATE_KEYS, PARAM_STATE_KEYS, STATE_KEY, Arena, same_order
from ._state.layout import arena_layout

__all__ = ["MLBFGS"]


class MLBFGS(Optimizer):
    r"""Momentum-smoothed, block-diagonal stochastic L-BFGS (mL-BFGS).

    Each step computes ``d = H g`` per block by the two-loop recursion over a
    ring of curvature pairs built every ``update_period`` steps from exponential
    moving averages of the parameters and gradients, normalises ``d`` over the
    group, and applies heavy-ball momentum. The exact math is in docs/design.md.

    Args:
        params: an iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (float or 1-element tensor). Default 0.1.
        momentum: heavy-ball momentum on the update. Default 0.9.
        weight_decay: L2 penalty added to the gradient. Default 0.
        history_size: number of curvature pairs kept per block. Default 10.
        update_period: steps between curvature pairs. Default 50.
        ema_decay: decay of the exponential moving averages of the parameters and of
            the gradients, ``(beta_p, beta_g)``. Default (0.999, 0.999). (Not ``betas``:
            schedulers that cycle momentum would take its first entry for Adam's beta1.)
        pair_momentum: momentum on the pairs themselves; 0 disables. Default 0.9.
        damping: ``phi`` is capped at ``1 - damping``. Default 0.01.
        sigma_low, sigma_high: Powell damping bounds on ``s.y / s.s``. Default 0.01, 1.5.
        eps: guard for divisions and the curvature test. Default 1e-12.
        normalize: when ``d`` is divided by its norm over the group: ``"always"`` (every
            step, the SGD warm-up before the first pair included, so ``lr`` is the length
            of the step before momentum from the first step on, whatever the scale of the
            loss), ``True`` (once a pair is held: the paper's rule, under which the
            warm-up steps by ``lr * g``) or ``False``. Default ``"always"``; the paper's
            math is ``normalize=True`` (docs/design.md, "The step", 4).
        blocks: ``"group"``, ``"tensor"``, a positive int (chunk size) or a list of
            lists of parameters. Default ``"group"``.
        maximize: maximise the objective. Default False.
        foreach: use the ``torch._foreach_*`` backend. Default None (chosen).
        fused: use a fused backend: the C++ kernels on CPU tensors (as torch's fused
            AdamW), Triton on CUDA tensors (the CUDA C++ kernels where Triton does not
            import). Default None: the fastest backend available for the parameters'
            device as measured by the benchmarks (C++ on the CPU, Triton on CUDA),
            foreach where none is.
        capturable: keep every counter on the device so the step can be captured
            in a CUDA graph. Default False. (The fused backend always does.)
        differentiable: not supported (raises).
        backend: ``None`` (chosen from ``fused``/``foreach``), ``"foreach"``, ``"triton"``,
            ``"cpp"`` (C++ on the CPU) or ``"cuda"`` (CUDA C++).
            With ``TRITON_INTERPRET=1``, ``"triton"`` runs the kernels on CPU tensors.
        history_dtype: storage dtype of the history rings (``None``: the parameter
            dtype; ``torch.bfloat16`` halves their bytes, arithmetic stays in the
            parameter dtype).
        variant: ``"paper"`` (default), the math of the paper, or ``"released"``, the
            averaging and pair timing of the authors' released code.
        distributed: ``None`` (default), ``"sharded"`` or ``"blockwise"``: each rank of
            ``process_group`` keeps the state of a slice of each group (``"sharded"``,
            exact global curvature) or of whole blocks (``"blockwise"``); parameters
            stay whole on every rank, or sharded where they are FSDP2 ``DTensor`` s
            (``"sharded"``). Every backend. See mlbfgs_fused/distributed/.
        process_group: the ``torch.distributed`` group of ``distributed`` (default: the
            default group).

    A parameter whose ``.grad`` is None at a step is left untouched. A step whose
    gradient holds a NaN or Inf changes nothing and is counted in
    ``skipped_steps`` (see :meth:`block_states`).

    ``zero_grad``, ``state_dict``, ``load_state_dict``, hooks, named parameters and
    LR schedulers behave as in ``torch.optim`` (schedulers that cycle momentum
    cycle ``momentum``). The state follows a parameter moved to another dtype or
    device after stepping (``model.to(torch.float64)``).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        history_size: int = 10,
        update_period: int = 50,
        ema_decay: tuple[float, float] = (0.999, 0.999),
        pair_momentum: float = 0.9,
        damping: float = 0.01,
        sigma_low: float = 0.01,
        sigma_high: float = 1.5,
        eps: float = 1e-12,
        normalize: bool | str = "always",
        blocks="group",
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        backend: str | None = None,
        history_dtype: torch.dtype | None = None,
        variant: str = "paper",
        distributed: str | None = None,
        process_group=None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            history_size=history_size,
            update_period=update_period,
            ema_decay=tuple(ema_decay) if isinstance(ema_decay, list) else ema_decay,
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
            variant=variant,
        )
        _validate_group(defaults)
        self._arenas: dict[int, _GroupArenas] = {}
        self._single: _SingleCall | None = None
        self._partition = None
        if distributed is not None:
            from .distributed import Partition

            self._partition = Partition(distributed, process_group)
        super().__init__(params, defaults)
        if self._partition is not None:  # each rank saves and loads its own shard
            self.register_state_dict_post_hook(self._partition.state_dict_post_hook)
            self.register_load_state_dict_pre_hook(self._partition.load_state_dict_pre_hook)

    # -- groups -----------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (``torch.optim.Optimizer.add_param_group``): its
        ``params`` may be tensors or ``(name, tensor)`` pairs, as ``named_parameters()``
        yields, and its ``blocks`` lists may name parameters by tensor, index or name."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        param_group = dict(param_group)  # the caller's dict is left as it was
        explicit_blocks = "blocks" in param_group
        # torch extracts names, fills defaults, raises its own errors and warnings, appends.
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            drop_duplicates(group)  # after torch's own warning
            if isinstance(group["blocks"], (list, tuple)):
                group["blocks"] = blocks_as_indices(
                    group["blocks"], group["params"], explicit_blocks, group.get("param_names")
                )
            _validate_group(group)
            if self._partition is not None:
                self._partition.check_group(group)
            if not group["fused"]:  # fused=True is checked when the step runs, as torch does
                backends.select(group).module  # imported now: a step compiled with fullgraph=True cannot import
        except BaseException:
            self.param_groups.pop()  # a bad group leaves no trace
            raise

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._arenas = {}
        self._single = None
        self.__dict__.setdefault("_partition", None)
        _fill_group_defaults(self.defaults)
        for group in self.param_groups:
            _fill_group_defaults(group)

    # -- checkpoints ------------------------------------------------------------
    @torch._disable_dynamo
    def load_state_dict(self, state_dict: dict) -> None:
        """Load the optimizer state (``torch.optim.Optimizer.load_state_dict``).

        Block state keeps its own dtypes (int64 counters, float64 Gram matrices, the
        history in ``history_dtype``) where torch would cast every floating tensor to
        the parameter's dtype; only its device follows the parameter. A checkpoint
        whose groups lack keys added since (``fused``, ``foreach``, ``maximize``,
        ``capturable``, ``differentiable``, ``ema_decay``, ...) loads with their
        defaults; one saved with ``betas`` has them read as ``ema_decay``."""
        state_dict = state_dict.copy()  # shallow, like torch: hooks may edit it
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        # Check the groups before anything is loaded, with defaults filled in as
        # __setstate__ will fill them.
        for saved in state_dict["param_groups"]:
            group = {key: value for key, value in saved.items() if key != "params"}
            _fill_group_defaults(group)
            _validate_group(group)
        # The block state keeps its own dtypes: set apart from what torch's loader casts.
        blocks = {}
        state = {}
        for key, value in state_dict["state"].items():
            if isinstance(value, dict):
                value = dict(value)
                if "blocks" in value:  # saved when the block state was a list of dicts per block
                    value.update(_flat_block_state(value.pop("blocks")))
                kept = {k: value.pop(k) for k in BLOCK_STATE_KEYS if k in value}
                if kept:
                    blocks[key] = kept
            state[key] = value
        # torch's loader does the rest (validation, id mapping, casting, param_names),
        # with the hooks run here instead, around the block state too.
        pre_hooks = self._optimizer_load_state_dict_pre_hooks
        post_hooks = self._optimizer_load_state_dict_post_hooks
        live_choices = [_backend_choice(group) for group in self.param_groups]
        previous = (self.state, self.param_groups, self._arenas)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict({**state_dict, "state": state})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        # Anything that fails from here on puts the optimizer back as it was.
        try:
            saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip(saved_ids, params):
                if pid in blocks:
                    self.state[p].update({k: torch.as_tensor(v).to(device=p.device) for k, v in blocks[pid].items()})
            for group, live in zip(self.param_groups, live_choices):
                _keep_backend_choice(group, live)
            self._arenas = {}
            for post_hook in self._optimizer_load_state_dict_post_hooks.values():
                post_hook(self)
            self._bind_loaded_state()
        except BaseException:
            self.state, self.param_groups, self._arenas = previous
            raise

    def _bind_loaded_state(self) -> None:
        """Build the arenas of every group that loaded state now, not at the next step,
        so that a checkpoint that is incomplete (a missing key, the curvature history
        of a block), does not fit these parameters (shapes, block layout) or holds a
        non-finite value is refused when it is loaded, with a clear error."""
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            loaded = [i for i, p in enumerate(params) if self.state.get(p)]
            if not loaded:
                continue  # nothing saved for this group: its state starts at its first step
            if self._partition is None:
                missing = [i for i in range(len(params)) if i not in loaded]
                if missing:
                    raise ValueError(
                        f"loaded optimizer state has no entry for parameter {_param_label(group, missing[0])} "
                        f"of group {index}, but has one for others of the group: the checkpoint "
                        "is incomplete"
                    )
            for i in loaded:
                _check_loaded_entries(self.state[params[i]], group, index, i)
            self._build_arenas(index, group)
            for arena in self._arenas[index].arenas:
                bad = arena.first_non_finite()
                if bad is not None:
                    raise ValueError(
                        f"loaded optimizer state '{bad}' of group {index} holds non-finite values; "
                        "every later step would be skipped. Load a checkpoint saved before the "
                        "values went bad"
                    )

    # -- the step ---------------------------------------------------------------
    # GradScaler.step hands its scale and inf checks over (``grad_scale``, ``found_inf``)
    # instead of unscaling the gradients and synchronising: see _amp_scaling.
    _step_supports_amp_scaling = True

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
        amp = self._amp_scaling()
        single = self._single
        if single is not None and single.holds(self.param_groups) and not torch.compiler.is_compiling():
            if single.plan.whole_step(single.group, amp):
                return loss
        self._single = None
        # Everything that can raise happens before the first write, so a bad
        # gradient in a later group cannot leave an earlier one updated.
        stepped = [i for i, group in enumerate(self.param_groups) if any(p.grad is not None for p in group["params"])]
        for index in stepped:  # a group without gradients is not stepped, nor checked
            group = self.param_groups[index]
            backend = backends.select(group)
            backends.check_devices(backends.stepped_params(group), backend)
            backend.module.check_gradients(group)
        work = []
        for index in stepped:
            group = self.param_groups[index]
            if all(p.grad is None or p.device.type == "meta" for p in group["params"]):
                continue  # only meta parameters: nothing to step (foreach=True would get here)
            self._init_group(index, group)
            plan = self._arenas[index].plan
            if plan.prepare(group):
                work.append((group, plan))
        if not work:
            return loss
        # One non-finite gradient anywhere (or GradScaler's found_inf) skips the whole
        # step: every group, every device; decided on the device, never on the host.
        probes = [p for group, plan in work for p in plan.gradient_dots(group, amp)]
        home = probes[0].device
        total = probes[0] if len(probes) == 1 else torch.stack([p.to(home) for p in probes]).sum()
        ok = torch.isfinite(total)
        if amp is not None and amp.found_inf is not None:
            ok = ok & (amp.found_inf.to(home) == 0)
        ok_on = {home: ok}
        for group, plan in work:
            for device in plan.devices:
                if device not in ok_on:
                    ok_on[device] = ok.to(device)
            backends.run_passes(plan, group, ok_on, amp)
        self._single = _SingleCall.of(self.param_groups, work, self._partition)
        return loss

    def _amp_scaling(self) -> backends.AmpScaling | None:
        """``GradScaler.step``'s ``grad_scale``/``found_inf`` attributes, when it set them."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None
        return backends.AmpScaling(grad_scale, found_inf)

    def _group_arenas(self, index: int, group: dict) -> list[Arena]:
        """The group's arenas, one per (device, dtype)."""
        self._build_arenas(index, group)
        return self._arenas[index].arenas

    def block_states(self, param: Tensor) -> list[dict]:
        """The state of each block that starts in ``param`` (arena order; none when no
        block starts there or before the first step), as views: ``step``,
        ``pair_count``, ``skipped_pairs``, ``skipped_steps`` (0-dim int64), ``history_s``,
        ``history_y`` (the ``[m, n_b]`` rings) and ``gram`` (``[3, m, m]``)."""
        return [
            arena.block_state(b)
            for built in self._arenas.values()
            for arena in built.arenas
            for i, p in enumerate(arena.params) if p is param  # a distributed rank: every piece
            for b in arena.blocks_by_param().get(i, [])
        ]

    def backend_plan(self, group_index: int = 0) -> backends.Plan:
        """The plan of the backend that steps group ``group_index``: its passes are the
        backend protocol (mlbfgs_fused/backends/__init__.py), for benchmarks and tests
        that run one pass at a time. Built as a step would build it."""
        group = self.param_groups[group_index]
        self._init_group(group_index, group)
        return self._arenas[group_index].plan

    def _init_group(self, index: int, group: dict) -> None:
        """The group's arenas (:meth:`_build_arenas`) and the plan of the backend that
        steps it, made when either changes.

        Named as torch's optimizers name their lazy state initialisation: under
        ``torch.compile`` Dynamo runs ``_init_group`` eagerly instead of tracing it
        and guards on the state it made, so even a compiled first step is one graph.
        """
        self._build_arenas(index, group)
        built = self._arenas[index]
        name = backends.select(group).name
        if built.plan is None or built.backend != name:
            if self._partition is not None:
                built.plan = self._partition.plan(built.arenas, group)
            else:
                built.plan = backends.get(name).module.plan(built.arenas, group)
            built.backend = name

    def _build_arenas(self, index: int, group: dict) -> None:
        """Build the group's arenas on first use, after a checkpoint is loaded, and
        after a parameter moved to another dtype, device or memory format (its state
        follows it).

        Everything that can raise runs before ``optimizer.state`` changes.
        """
        params = group["params"]
        key = _ArenaKey(
            tuple(map(id, params)), tuple(map(_kind, params)),
            group["history_size"], group["history_dtype"], repr(group["blocks"]),
        )
        cached = self._arenas.get(index)
        if cached is not None and cached.key == key:
            return
        self._single = None
        stepped = cached is not None and cached.key.ids == key.ids  # the same parameters, changed
        if stepped:
            _check_unchanged_structure(index, group, cached.key, key, self._partition is not None)
        check_parameters(params, group["history_dtype"])  # after model.to(...) or p.data = ...
        by_kind: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if p.device.type != "meta":  # no state until materialised (model.to_empty)
                by_kind.setdefault((p.device, p.dtype), []).append(i)
        layouts = []
        for indices in by_kind.values():
            blocks = group["blocks"]
            if isinstance(blocks, list):
                local = {g: l for l, g in enumerate(indices)}
                blocks = [[local[i] for i in blk if i in local] for blk in blocks]
                blocks = [blk for blk in blocks if blk]
                if sum(len(b) for b in blocks) != len(indices):
                    raise ValueError("a block may not mix parameters of different devices or dtypes")
            layout = arena_layout([params[i].numel() for i in indices], blocks)
            layouts.append((indices, layout))
        if stepped:
            position = {id(p): i for i, p in enumerate(params)}
            before = sorted(
                piece
                for arena in cached.arenas
                for piece in _block_pieces(arena.layout, [position[id(p)] for p in arena.params], params)
            )
            after = sorted(
                piece
                for indices, layout in layouts
                for piece in _block_pieces(layout, [indices[i] for i in layout.order], params)
            )
            if before != after:
                raise RuntimeError(
                    f"parameters of group {index} moved to other dtypes or devices after the "
                    "optimizer stepped them, splitting or merging its blocks (a block lives on "
                    "one dtype and device); the state of those blocks cannot follow. Convert "
                    "every parameter of a block alike (model.to(...) on the whole model), or "
                    "use blocks='tensor', or build a new optimizer"
                )
        arenas = []
        for indices, layout in layouts:
            arena_params = [params[i] for i in indices]
            if self._partition is None:
                arena = Arena(arena_params, layout, group["history_size"], group["history_dtype"])
            else:
                arena = self._partition.arena(
                    arena_params, layout, group["history_size"], group["history_dtype"], salt=index
                )
            arenas.append(arena)
        # Filling copies what the state holds (a loaded checkpoint, or views of the
        # arenas these replace) into the new buffers, converting dtype, device and
        # memory order: the state follows its parameter. Only once every arena is
        # filled does the state point at them, so an error leaves it as it was.
        for arena in arenas:
            arena.fill(self.state)
        for arena in arenas:
            arena.bind(self.state)
        self._arenas[index] = _GroupArenas(key, arenas)


def _block_pieces(layout, group_indices: list[int], params: list[Tensor]) -> list[tuple]:
    """Each block of an arena as the pieces of the group's parameters it covers,
    ``((param index in the group, first element, end), ...)``; ``group_indices``
    lists the group index of each parameter in arena order."""
    blocks = []
    for b in range(layout.num_blocks):
        lo, hi = layout.block_bounds[b], layout.block_bounds[b + 1]
        pieces = []
        for start, i in zip(layout.param_offsets, group_indices):
            stop = start + params[i].numel()
            if start < hi and lo < stop:
                pieces.append((i, max(lo, start) - start, min(hi, stop) - start))
        blocks.append(tuple(pieces))
    return blocks


def _flat_block_state(blocks: list) -> dict:
    """The block state of a checkpoint that kept it as a list of per-block dicts
    (``state[p]["blocks"]``) under today's keys (mlbfgs_fused/_state/arena.py)."""
    old_keys = (*BLOCK_COUNTER_DTYPES, "history_s", "history_y", "gram")
    for block in blocks:
        missing = [key for key in old_keys if not (isinstance(block, dict) and key in block)]
        if missing:
            raise ValueError(f"loaded optimizer state has a block without {missing}: the checkpoint is incomplete")
    out = {STATE_KEY[key]: torch.stack([torch.as_tensor(b[key]).reshape(()) for b in blocks])
           for key in BLOCK_COUNTER_DTYPES}
    out["gram"] = torch.stack([torch.as_tensor(b["gram"]) for b in blocks])
    for key in ("history_s", "history_y"):
        rings = [torch.as_tensor(b[key]) for b in blocks]
        out[key] = rings[0] if len(rings) == 1 else torch.cat([r.reshape(-1) for r in rings])
    return out


def _check_loaded_entries(p_state: dict, group: dict, index: int, i: int) -> None:
    """A loaded parameter's state holds every per-element key (none is made up)."""
    missing = [key for key in PARAM_STATE_KEYS if key not in p_state]
    if missing:
        raise ValueError(
            f"loaded optimizer state of parameter {_param_label(group, i)} of group {index} "
            f"lacks {missing}: the checkpoint is incomplete"
        )


def _param_label(group: dict, i: int) -> str:
    names = group.get("param_names")
    return f"{i} ({names[i]!r})" if names else str(i)


def _backend_choice(group: dict) -> tuple:
    return group["backend"], group["fused"], group["foreach"]


def _keep_backend_choice(group: dict, live: tuple) -> None:
    """The backend is this process's choice, not the checkpoint's: a group keeps the
    ``backend``/``fused``/``foreach`` it was built with unless they were left to their
    defaults; then it takes the checkpoint's where that backend can run here, and the
    default choice otherwise."""
    if any(value is not None for value in live):
        group["backend"], group["fused"], group["foreach"] = live
        return
    try:
        backends.check_devices(group["params"], backends.select(group))
    except RuntimeError:
        group["backend"], group["fused"], group["foreach"] = live


def _validate_group(group: dict) -> None:
    """Raise PyTorch's error for a bad hyperparameter or flag of a group (or of the
    defaults), before anything is written."""
    validate_hyperparameters(group)
    backend, fused, foreach = group["backend"], group["fused"], group["foreach"]
    if backend is not None:
        backends.get(backend)  # raises, naming the registered backends
        if backends.get(backend).fused and foreach:
            raise RuntimeError(f"`foreach=True` contradicts `backend={backend!r}`")
        if not backends.get(backend).fused and fused:
            raise RuntimeError(f"`fused=True` contradicts `backend={backend!r}`")


def _kind(p: Tensor) -> tuple:
    """What the arena cache notices of a parameter besides its identity."""
    return p.device, p.dtype, p.shape, p.stride()


class _ArenaKey(NamedTuple):
    """What a group's arenas were built for: when it changes, they are rebuilt."""

    ids: tuple[int, ...]
    kinds: tuple[tuple, ...]
    history_size: int
    history_dtype: torch.dtype | None
    blocks: str


@dataclass
class _GroupArenas:
    """A group's arenas, what they were built for, and the plan of the backend that
    steps them (remade when the group's backend changes)."""

    key: _ArenaKey
    arenas: list[Arena]
    backend: str | None = None
    plan: backends.Plan | None = None


# The group settings a plan is made for (the backend, its arenas' shape): the one-call
# step checks them by identity at every step.
_PLAN_KEYS = ("backend", "fused", "foreach", "variant", "history_size", "history_dtype", "blocks")


class _SingleCall:
    """An optimizer of one group whose plan runs a step as one call (``Plan.whole_step``):
    set after a step of the general path that finds it so, checked at every step (the
    same group, its plan settings the same objects), dropped whenever the general path
    runs. The plan checks the rest (parameters, gradients) itself, writing nothing
    where they do not fit."""

    __slots__ = ("group", "plan", "settings")

    def __init__(self, group: dict, plan: backends.Plan):
        self.group, self.plan = group, plan
        self.settings = tuple(group[key] for key in _PLAN_KEYS)

    def holds(self, groups: list[dict]) -> bool:
        group = self.group
        return (
            len(groups) == 1
            and groups[0] is group
            and all(group[key] is value for key, value in zip(_PLAN_KEYS, self.settings))
        )

    @classmethod
    def of(cls, groups: list[dict], work: list, partition) -> _SingleCall | None:
        if partition is not None or len(groups) != 1 or len(work) != 1:
            return None
        group, plan = work[0]
        return cls(group, plan) if plan.single_call else None


def _check_unchanged_structure(index: int, group: dict, old: _ArenaKey, new: _ArenaKey, distributed: bool) -> None:
    """Raise a clear error for a change the state of a group that has stepped cannot
    follow: the size or dtype of its history, its blocks, a parameter's shape (or, on a
    distributed rank, a parameter's memory format)."""
    for name, before, after in (
        ("history_size", old.history_size, new.history_size),
        ("history_dtype", old.history_dtype, new.history_dtype),
        ("blocks", old.blocks, new.blocks),
    ):
        if before != after:
            raise RuntimeError(
                f"{name} of parameter group {index} changed from {before} to {after} after the "
                f"optimizer stepped it; its curvature history was built for {name}={before} and "
                f"cannot follow. Set {name} back to {before}, or build a new optimizer"
            )
    for (_, _, shape, stride), (_, _, old_shape, old_stride) in zip(new.kinds, old.kinds):
        if shape != old_shape:
            raise RuntimeError(
                f"a parameter of group {index} changed shape from {tuple(old_shape)} "
                f"to {tuple(shape)} after the optimizer stepped it; its optimizer state "
                "cannot follow. Restore its shape, or build a new optimizer for the "
                "reshaped model"
            )
        if distributed and not same_order(shape, stride, old_stride):
            raise RuntimeError(
                f"a parameter of group {index} changed memory format after the optimizer "
                "stepped it (e.g. model.to(memory_format=...)); MLBFGS(distributed=...) keeps "
                "each rank's state flat in the memory order it started with. Convert the model "
                "before building the optimizer"
            )

# Keys added to the groups since the first release, with the value an older
# checkpoint or pickled optimizer gets.
_GROUP_DEFAULTS = {
    "maximize": False,
    "foreach": None,
    "fused": None,
    "capturable": False,
    "differentiable": False,
    "backend": None,
    "history_dtype": None,
    "variant": "paper",
    "ema_decay": (0.999, 0.999),
}


def _fill_group_defaults(group: dict) -> None:
    """Fill what an older checkpoint's group lacks, as torch's optimizers do in
    ``__setstate__``; the EMA decays once saved as ``betas`` become ``ema_decay``."""
    if "betas" in group:
        group.setdefault("ema_decay", tuple(group.pop("betas")))
    for key, value in _GROUP_DEFAULTS.items():
        group.setdefault(key, value)
