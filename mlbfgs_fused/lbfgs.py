"""``LBFGS``: a drop-in for ``torch.optim.LBFGS`` on the package's backends."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _bounds, backends
from ._line_search import Point, _strong_wolfe
from ._state.arena import is_dense
from ._state.layout import arena_layout
from ._state.lbfgs_arena import LBFGSArena
from .backends._lbfgs import (
    READ_FIXED,
    READ_GTD,
    READ_GG,
    READ_GL1,
    READ_GMAX,
    READ_GTD_NEXT,
    READ_LOSS,
    SOURCE_GRAD,
    SOURCE_KEPT,
    SOURCE_PREV,
)

__all__ = ["LBFGS"]

# The settings that shape the one quasi-Newton model and its loop: the same in every group.
_GLOBAL_KEYS = ("max_iter", "max_eval", "max_eval_given", "tolerance_grad", "tolerance_change",
                "history_size", "line_search_fn", "maximize", "foreach", "fused", "backend", "history_dtype")
# Keys a group saved by an older version lacks, with the meaning they had then.
_OLDER_GROUPS = {"max_eval_given": True, "maximize": False, "foreach": None, "fused": None, "backend": None,
                 "history_dtype": None, "bounds": None}
_PARAM_DTYPES = (torch.float32, torch.float64)
_HISTORY_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
DISTRIBUTED_MODES = ("sharded",)


@dataclass
class _Evaluation:
    """What the host read after one closure evaluation (one copy: the read vector)."""

    f: float  # the loss to minimise (negated under maximize); NaN when it or g is not finite
    gtd: float  # g . p at a trial point, p the step direction
    gtd_next: float  # g . d of the direction this point would take (with `model`)
    gmax: float  # max |g|
    g_l1: float  # |g|_1
    d_max: list[float] = field(default_factory=list)  # max |d| of each arena's last direction
    model: bool = False  # whether the plan's model (coefficients, pair) is this point's
    index: int = 0
    t_taken: float = 0.0  # the step length that reached it (line search)


class LBFGS(Optimizer):
    r"""L-BFGS with torch's constructor, closure protocol and algorithm.

    ``torch.optim.LBFGS`` code changes only its import: the same termination rules, the
    same strong-Wolfe line search (cubic interpolation, ``c1 = 1e-4``, ``c2 = 0.9``), a
    pair ``(s, y)`` stored only when ``s.y > 1e-10``, ``H0 = s.y / y.y`` of the newest
    pair, a first step of ``min(1, 1 / |g|_1) * lr``, the counters ``n_iter`` and
    ``func_evals`` in ``state[first_param]``, and ``max_eval`` left to its default
    meaning what it means in torch (``max_iter * 5 // 4``, which torch's line search may
    overrun by one evaluation). Underneath, the state lives in flat arenas (per group,
    device and dtype: the history ring and the per-parameter vectors; docs/design.md,
    "State layout" and "LBFGS"), the two-loop recursion runs on a Gram matrix of the
    history ("The vector-free two-loop"), and an iteration is a few in-place passes on
    one of the package's backends (C++ on the CPU, Triton or CUDA C++ on a GPU, or
    ``torch._foreach_*``). The host reads one small vector per closure evaluation (the
    loss and the line search's scalars, with the next direction's ``g.d``) and nothing
    else; no iteration allocates.

    ``state[first_param]`` holds ``func_evals``, ``n_iter``, ``t`` and ``prev_loss`` as
    torch does, and the model: ``gram`` (``[3, m, m]`` float64: ``S S^T``, ``S Y^T``,
    ``Y Y^T`` in slot order, the Gram convention of MLBFGS) and ``pair_count``. Each
    parameter's state holds its slice of ``direction`` (torch's ``d``) and ``prev_grad``;
    the first parameter of each (group, device, dtype) its ring (``history_s``,
    ``history_y``, ``[m, n]``, as an MLBFGS block's) and ``step_size`` (the last step was
    ``step_size * direction``). torch's own keys (``d``, ``old_dirs``, ...) are not kept,
    so checkpoints do not move between the two classes; those of earlier versions of
    this class load.

    Beyond torch:

    - Several parameter groups: one quasi-Newton model over all parameters; a group's
      ``lr`` scales its part of every step (relative to the first group's, which plays
      torch's ``lr``). The loop settings (``max_iter``, ``max_eval``, the tolerances,
      ``history_size``, ``line_search_fn``, ``maximize``, the backend, ``history_dtype``)
      are the same in every group.
    - Parameters on several devices and dtypes (float32, float64; several devices run on
      the foreach backend).
    - ``maximize``; ``history_dtype`` (e.g. ``torch.bfloat16``: half the history's bytes).
    - An explicit ``max_eval`` holds exactly, also inside the line search.
    - A trial point whose loss or gradient is not finite is a failed trial: the line
      search backs off (without one, the step is halved until the point is finite or
      ``max_eval`` is reached, then undone); it never enters the history. A step that
      starts at a non-finite point returns without changing anything.
    - Under ``torch.distributed`` (when initialised), the vector the host reads is
      averaged over the ranks before any decision, so every rank makes the same
      decisions and runs the closure the same number of times (the closure averages
      the gradients, as DDP does).
    - ``distributed="sharded"``: each rank of ``process_group`` keeps the history,
      ``direction`` and ``prev_grad`` of its contiguous ``1/W`` slice of each (group,
      device, dtype) only; the Gram rows, the line search's dots and the loss are partial
      sums completed by one all-reduce of one small float64 tensor per closure
      evaluation, and each rank's updated slice is all-gathered into the parameters
      before the closure runs (docs/design.md, "Distributed"). The parameters stay whole
      on every rank, and every rank takes the same decisions. Every backend; each rank's
      ``state_dict()`` holds its slice (``mlbfgs_fused.distributed.sharded_state_dict``
      for ``torch.distributed.checkpoint``).

    Args:
        params: an iterable of parameters or of dicts defining parameter groups.
        lr: learning rate (default: 1).
        max_iter: maximal number of iterations per optimization step (default: 20).
        max_eval: maximal number of function evaluations per optimization step
            (default: max_iter * 1.25, with torch's meaning).
        tolerance_grad: termination tolerance on first order optimality (default: 1e-7).
        tolerance_change: termination tolerance on function value/parameter changes
            (default: 1e-9).
        history_size: update history size (default: 100).
        line_search_fn: either 'strong_wolfe' or None (default: None).
        maximize: maximise the objective (default: False).
        foreach, fused: choose the backend as ``torch.optim`` does (default: None: C++ on
            the CPU, Triton on CUDA, where available; ``foreach`` otherwise).
        backend: a backend by name: ``"foreach"``, ``"cpp"``, ``"triton"``, ``"cuda"``.
        history_dtype: the history's storage dtype (default: the parameters').
        bounds: ``(lower, upper)``, the box ``lower <= p <= upper`` for every group that
            does not set its own ``bounds`` (default: None, no bound). Each of ``lower``,
            ``upper`` is None (no bound), a number, or, in a group of one parameter, a
            tensor of that parameter's shape; entries may be infinite. With a bound in
            any group the step is L-BFGS-B (docs/design.md, "Bounds in LBFGS"): the
            parameters are projected into the box, every trial point lies in it, the
            step is the generalized Cauchy point and the subspace minimisation on the
            compact representation, the line search Moré and Thuente's on the feasible
            segment (``line_search_fn`` is not used), a pair is kept unless
            ``s.y <= eps (-g.s)``; the run stops when the projected gradient's max-norm
            is at most ``tolerance_grad`` or when ``f`` decreases by at most
            ``tolerance_change * max(|f_old|, |f|, 1)`` (scipy's ``gtol`` and ``ftol``).
            ``lr`` scales the first trial step and must be the same in every group.
        distributed: ``None`` (default) or ``"sharded"``: each rank keeps the state of
            its slice of the parameters (above). Needs an initialised process group;
            not with ``bounds`` yet (NotImplementedError).
        process_group: the ``torch.distributed`` group of ``distributed`` (default: the
            default group).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        backend: str | None = None,
        history_dtype: torch.dtype | None = None,
        bounds: tuple | None = None,
        distributed: str | None = None,
        process_group=None,
    ):
        _bounds.group_bounds(bounds)  # bounds: its form checked now (a group checks the rest)
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if backend is not None:
            backends.get(backend)  # raises, naming the registered backends
        if line_search_fn not in (None, "strong_wolfe"):
            raise RuntimeError("only 'strong_wolfe' is supported")
        for name, value, least in (("max_iter", max_iter, 0), ("history_size", history_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Invalid {name} value: {value}")
        max_eval_given = max_eval is not None
        if not max_eval_given:
            max_eval = max_iter * 5 // 4  # torch's default, with torch's meaning (see step)
        elif isinstance(max_eval, bool) or not isinstance(max_eval, int) or max_eval < 1:
            raise ValueError(f"Invalid max_eval value: {max_eval}")
        if history_dtype is not None and history_dtype not in _HISTORY_DTYPES:
            raise ValueError(
                f"Invalid history_dtype: {history_dtype} (expected None or one of {list(_HISTORY_DTYPES)})"
            )
        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            max_eval_given=max_eval_given,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            backend=backend,
            history_dtype=history_dtype,
            bounds=bounds,  # bounds: the default of every group
        )
        self._plan = None
        self._partition = None
        if distributed is not None:
            from .distributed import Partition

            self._partition = Partition(distributed, process_group, owner="LBFGS", modes=DISTRIBUTED_MODES)
        super().__init__(params, defaults)
        if self._partition is not None:  # each rank saves and loads its own shard
            self.register_state_dict_post_hook(self._partition.state_dict_post_hook)
            self.register_load_state_dict_pre_hook(self._partition.load_state_dict_pre_hook)

    def add_param_group(self, param_group: dict) -> None:
        for key in _GLOBAL_KEYS:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"LBFGS takes '{key}' once for all parameter groups: a group sets "
                    f"{param_group[key]!r}, the optimizer {self.defaults[key]!r}"
                )
        lr = param_group.get("lr", self.defaults["lr"])
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        history_dtype = self.defaults["history_dtype"]
        params = param_group["params"]
        if not isinstance(params, (Tensor, set)):
            params = param_group["params"] = list(params)
        # bounds: checked against the group's parameters and the other groups' lr.
        _bounds.check_group({"lr": lr, "bounds": param_group.get("bounds", self.defaults["bounds"])},
                            params, self.param_groups)
        if self._partition is not None and _bounds.group_bounds(param_group.get("bounds", self.defaults["bounds"])):
            raise NotImplementedError("LBFGS(distributed='sharded') does not support bounds yet")
        for p in [params] if isinstance(params, Tensor) else params:
            if isinstance(p, Tensor) and p.dtype not in _PARAM_DTYPES:
                raise ValueError(f"LBFGS optimizes float32 and float64 parameters, got {p.dtype}")
            if isinstance(p, Tensor) and history_dtype == torch.float64 and p.dtype != torch.float64:
                raise ValueError(
                    f"Invalid history_dtype: {history_dtype} for {p.dtype} parameters (their "
                    "arithmetic runs in their own dtype: a float64 history would store nothing more)"
                )
        super().add_param_group(param_group)
        self._plan = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plan = None
        self.__dict__.setdefault("_partition", None)
        for group in [self.defaults, *self.param_groups]:
            for key, value in _OLDER_GROUPS.items():
                group.setdefault(key, value)

    # -- checkpoints --------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load the optimizer state (``torch.optim.Optimizer.load_state_dict``).

        The model keeps its own dtypes (float64 ``gram``, int64 ``pair_count``, the ring
        in ``history_dtype``) where torch would cast every floating tensor to the
        parameter's dtype. Checkpoints of earlier versions load into today's layout
        (docs/design.md, "LBFGS": the ``[2m, 2m + 1]`` model of version 0.2, the
        ``[3, m, m]`` model with ``ring_grad_dots`` of version 0.1). The state is checked
        as it loads (shapes, a missing ring, non-finite values): a checkpoint that does
        not fit raises and leaves the optimizer as it was."""
        kept = {}
        state = {}
        for key, value in state_dict["state"].items():
            if isinstance(value, dict):
                kept[key] = {k: value[k] for k in ("gram", "pair_count", "history_s", "history_y") if k in value}
                value = {k: v for k, v in value.items() if k not in kept[key]}
            state[key] = value
        previous = (self.state, self.param_groups, self._plan)
        super().load_state_dict({**state_dict, "state": state})
        try:
            saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            for pid, p in zip(saved_ids, params):
                for k, v in kept.get(pid, {}).items():
                    self.state[p][k] = torch.as_tensor(v).to(p.device)
            _upgrade_state(self.state, self.param_groups[0]["params"][0], self._arena_firsts())
            self._plan = None
            self._setup()  # checks the loaded state now, not at the next step
        except BaseException:
            self.state, self.param_groups, self._plan = previous
            raise
        self._warn_non_finite()

    def _warn_non_finite(self) -> None:
        """A loaded state with a NaN or an infinity loads, as torch.optim.LBFGS's does: it
        is what a run that diverged saves, and a checkpoint must resume the run it was
        saved from. It is said, since every later direction inherits it."""
        first = self.state[self._first_param()]
        bad = next((b for b in (a.first_non_finite() for a in self._arenas) if b is not None), None)
        if bad is None and not bool(torch.isfinite(first["gram"]).all()):
            bad = "gram"
        if bad is not None:
            warnings.warn(
                f"loaded optimizer state '{bad}' holds a NaN or an infinity (the run it was saved "
                "from had diverged); the directions computed from it will not be finite",
                stacklevel=3,
            )

    # -- state ------------------------------------------------------------------------
    def _first_param(self) -> Tensor:
        return self.param_groups[0]["params"][0]

    def _arena_params(self) -> list[tuple[int, list[Tensor]]]:
        """The parameters of each (group, device, dtype), groups first, in order."""
        out = []
        for index, group in enumerate(self.param_groups):
            kinds: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                kinds.setdefault((p.device, p.dtype), []).append(p)
            out.extend((index, params) for params in kinds.values())
        return out

    def _arena_firsts(self) -> list[Tensor]:
        return [params[0] for _, params in self._arena_params()]

    def _backend(self) -> backends.Backend:
        """The backend of the whole optimizer (one model), chosen as MLBFGS chooses a
        group's; the fused LBFGS plans take parameters on one device, dense."""
        d = self.defaults
        params = [p for g in self.param_groups for p in g["params"]]
        choice = {"params": params, "fused": d["fused"], "foreach": d["foreach"], "backend": d["backend"]}
        backend = backends.select(choice)
        one_place = len({p.device for p in params}) == 1 and all(map(is_dense, params))
        if backend.name != "foreach" and not one_place:
            if d["fused"] or d["backend"] is not None:
                raise RuntimeError(
                    f"LBFGS on the {backend.name!r} backend takes dense parameters on one device; "
                    "these are on several devices or strided: use foreach=True"
                )
            backend = backends.get("foreach")
        backends.check_devices(params, backend)
        return backend

    def _setup(self):
        """The arenas and the plan, built once (and after a load), adopting ``self.state``."""
        if self._plan is not None:
            return self._plan
        d = self.defaults
        m = d["history_size"]
        backend = self._backend()
        arenas = []
        partition = self._partition
        for a, (group, params) in enumerate(self._arena_params()):
            layout = arena_layout([p.numel() for p in params], "group")
            if partition is None:
                arena = LBFGSArena(params, layout, m, d["history_dtype"], group, a)
            else:  # this rank's slice of the arena (docs/design.md, "Distributed")
                arena = partition.lbfgs_arena(params, layout, m, d["history_dtype"], group, a)
            arena.fill(self.state)
            arenas.append(arena)
        first = self.state[self._first_param()]
        home = arenas[0].device
        gram = first.get("gram")
        count = first.get("pair_count")
        if gram is None:
            gram = torch.zeros(3, m, m, dtype=torch.float64, device=home)
            count = torch.zeros((), dtype=torch.int64, device=home)
        if tuple(gram.shape) != (3, m, m):
            raise ValueError(f"loaded state 'gram' has shape {tuple(gram.shape)}, expected {(3, m, m)}")
        gram = gram.to(home, torch.float64).clone()
        count = torch.as_tensor(count).to(home, torch.int64).reshape(()).clone()
        plan = backend.module.lbfgs_plan(arenas, gram, count, d["maximize"], d["line_search_fn"] is not None)
        if partition is not None:
            plan = partition.lbfgs_plan(plan, arenas)
        for arena in arenas:
            arena.bind(self.state)
            self.state[arena.anchor].setdefault("step_size", 0.0)
        first = self.state[self._first_param()]
        first["gram"], first["pair_count"] = gram, count
        self._plan = plan
        self._arenas = arenas
        return plan

    def _init_state(self) -> None:
        """Every entry of the state made now, as the first step makes it (the counters at
        zero), so that ``torch.distributed.checkpoint`` finds each key to load into
        (:func:`mlbfgs_fused.distributed.sharded_state_dict`)."""
        self._setup()
        state = self.state[self._first_param()]
        for key, value in (("func_evals", 0), ("n_iter", 0), ("t", 0.0), ("prev_loss", 0.0)):
            state.setdefault(key, value)

    @property
    def plan(self):
        """The backend's LBFGS plan (built at the first step): its passes, for benchmarks
        and tests that run one at a time."""
        return self._setup()

    # -- host reads -------------------------------------------------------------------
    def _read(self, plan) -> list[float]:
        """The one device-to-host copy of an evaluation: the read vector, averaged over
        the ranks when distributed (under ``distributed="sharded"`` the plan completed it)."""
        vec = plan.read
        if self._partition is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(vec)
                vec /= world
        return vec.tolist()

    def _evaluate(self, closure, plan, alphas, pair: bool, ring: bool, index: int = 0, gd: bool = False,
                  l1: bool = False):
        """Run the closure and the passes of an evaluation; read once. ``gd``: a line-search
        trial (``g . p`` is read); ``l1``: the first iteration's step needs ``|g|_1``."""
        with torch.enable_grad():  # as torch wraps the closure, without a wrapper per step
            loss = closure()
        plan.bind()
        plan.gradient_dots(SOURCE_GRAD, alphas, pair, ring, gd, l1)
        read_loss = loss
        on_device = isinstance(loss, Tensor) and loss.device == plan.home and loss.numel() == 1
        if not on_device and self._partition is not None:
            # The plan averages the loss over the ranks with its sums.
            read_loss = torch.as_tensor(float(loss), dtype=torch.float64, device=plan.home)
            on_device = True
        plan.two_loop(read_loss if on_device else None, pair, ring)
        return loss, self._evaluation(plan, loss if not on_device else None, ring, index)

    def _evaluation(self, plan, host_loss, model: bool, index: int) -> _Evaluation:
        read = self._read(plan)
        f = read[READ_LOSS] if host_loss is None else float(host_loss)
        if self.defaults["maximize"]:
            f = -f
        if not (math.isfinite(f) and math.isfinite(read[READ_GG])):
            f = math.nan
        return _Evaluation(
            f=f, gtd=read[READ_GTD], gtd_next=read[READ_GTD_NEXT], gmax=read[READ_GMAX],
            g_l1=read[READ_GL1], d_max=read[READ_FIXED:], model=model, index=index,
        )

    def _refresh_model(self, plan, source: int, alphas, pair: bool, at: _Evaluation) -> _Evaluation:
        """The direction model of the current point when the evaluation that made it is
        not the plan's last (the line search returned an earlier point): one more pass
        and one more read."""
        plan.gradient_dots(source, alphas, pair, True)
        plan.two_loop(None, pair, True)
        fresh = self._evaluation(plan, 0.0, True, at.index)
        at.gtd_next, at.model, at.d_max = fresh.gtd_next, True, fresh.d_max
        return at

    # -- the step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float | Tensor]):  # type: ignore[override]
        """Perform a single optimization step.

        Args:
            closure (Callable): A closure that reevaluates the model
                and returns the loss.
        """
        if _bounds.bounded(self):  # bounds: L-BFGS-B (mlbfgs_fused/_bounds.py)
            return _bounds.step(self, closure)
        cfg = self.param_groups[0]  # the loop settings are the same in every group
        max_iter, max_eval = cfg["max_iter"], cfg["max_eval"]
        exact = cfg["max_eval_given"]
        tolerance_grad, tolerance_change = cfg["tolerance_grad"], cfg["tolerance_change"]
        line_search = cfg["line_search_fn"] is not None
        plan = self._setup()
        arenas = self._arenas
        lr = float(cfg["lr"])
        # The first group's lr is torch's lr (it is in t); with lr = 0 no step moves at all.
        scales = [float(self.param_groups[a.group]["lr"]) / lr if lr != 0 else 1.0 for a in arenas]
        plan.scales = scales

        state = self.state[self._first_param()]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        step_sizes = [self.state[a.anchor]["step_size"] for a in arenas]

        orig_loss, point = self._evaluate(closure, plan, step_sizes, state["n_iter"] > 0, max_iter > 0,
                                          l1=state["n_iter"] == 0)
        current_evals = 1
        state["func_evals"] += 1
        if not math.isfinite(point.f) or point.gmax <= tolerance_grad:
            return orig_loss

        source = SOURCE_GRAD  # where the gradient of the current point is
        prev_loss = state.get("prev_loss")
        t = state.get("t")
        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            state["n_iter"] += 1
            pair = state["n_iter"] > 1  # torch starts its history afresh at its first iteration

            # -- direction: the model of the current point (computed with its evaluation)
            if not point.model:
                point = self._refresh_model(plan, source, step_sizes, pair, point)
            gtd = point.gtd_next
            prev_loss = point.f
            f = point.f
            t = min(1.0, 1.0 / point.g_l1 if point.g_l1 > 0 else math.inf) * lr if state["n_iter"] == 1 else lr
            moves = [t * s for s in scales]
            if gtd > -tolerance_change:
                plan.direction(source, step_sizes, None, False, pair)
                step_sizes = moves
                break

            # -- step length ----------------------------------------------------------
            ls_func_evals = 0
            opt_cond = False
            stop = False
            if line_search and exact and current_evals >= max_eval:
                plan.direction(source, step_sizes, None, False, pair)
                t, stop = 0.0, True  # no evaluation left to try a step with
            elif line_search:
                plan.direction(source, step_sizes, moves, True, pair)
                # torch's line search may take one evaluation past its max_eval (it
                # budgets the trials after the first); a max_eval the user set holds.
                budget = max_eval - current_evals + (0 if exact else 1)
                point, ls_func_evals, source = self._line_search(
                    closure, plan, point, gtd, t, budget, tolerance_change,
                    n_iter < max_iter, max_eval - current_evals,
                )
                t, f = point.t_taken, point.f
                opt_cond = point.gmax <= tolerance_grad
            else:
                plan.direction(source, step_sizes, moves, False, pair)
                if n_iter != max_iter and (not exact or current_evals < max_eval):
                    budget = max_eval - current_evals
                    while True:
                        ls_func_evals += 1
                        more = n_iter < max_iter and current_evals + ls_func_evals < max_eval
                        _, trial = self._evaluate(closure, plan, [t * s for s in scales], True, more)
                        if math.isfinite(trial.f):
                            f = trial.f
                            break
                        # A failed trial: halve the step while evaluations remain, else undo it.
                        t_new = t / 2 if ls_func_evals < budget else 0.0
                        plan.move([(t_new - t) * s for s in scales], from_saved=False)
                        t = t_new
                        if t == 0.0:
                            stop = True
                            break
                    point, source = trial, SOURCE_GRAD
                    opt_cond = trial.gmax <= tolerance_grad

            current_evals += ls_func_evals
            state["func_evals"] += ls_func_evals
            step_sizes = [t * s for s in scales]

            # -- termination ------------------------------------------------------------
            if stop or n_iter == max_iter or current_evals >= max_eval or opt_cond:
                break
            if max(abs(t * s) * dm for s, dm in zip(scales, point.d_max)) <= tolerance_change:
                break
            if abs(f - prev_loss) < tolerance_change:
                break

        for arena, size in zip(arenas, step_sizes):
            self.state[arena.anchor]["step_size"] = size
        state["t"] = t
        state["prev_loss"] = prev_loss
        return orig_loss

    def _line_search(self, closure, plan, start: _Evaluation, gtd: float, t: float, budget: int,
                     tolerance_change: float, more_iterations: bool, evals_left: int):
        """Strong-Wolfe search from the saved current point (the direction pass saved it
        and took the first trial step); leaves the parameters at the accepted point.
        Returns ``(its evaluation, with t_taken set; evaluations; source of its gradient)``."""
        scales = plan.scales
        at = {"t": t, "kept": None}
        points = {0: start}

        def evaluate(step: float) -> tuple[float, float]:
            if step != at["t"]:
                plan.move([step * s for s in scales], from_saved=True)
                at["t"] = step
            k = len(points)
            # The dots with the ring only where this point may start another iteration.
            ring = more_iterations and k < evals_left
            _, trial = self._evaluate(closure, plan, [step * s for s in scales], True, ring, index=k, gd=True)
            points[k] = trial
            return trial.f, trial.gtd

        def keep(point: Point) -> None:
            plan.keep()
            at["kept"] = point.index

        def d_norm() -> float:
            last = points[len(points) - 1]
            return max(abs(s) * dm for s, dm in zip(scales, last.d_max))

        found, evals = _strong_wolfe(evaluate, keep, start.f, gtd, t, d_norm, budget, tolerance_change=tolerance_change)
        if found.t != at["t"]:
            plan.move([found.t * s for s in scales], from_saved=True)
        accepted = points[found.index]
        accepted.d_max = points[evals].d_max if evals else accepted.d_max
        if found.index == evals and evals > 0:
            source = SOURCE_GRAD
        elif found.index == 0:
            source = SOURCE_PREV  # the direction pass copied the start's gradient there
        else:
            if at["kept"] != found.index:
                raise AssertionError("line search returned a point whose gradient was not kept")
            source = SOURCE_KEPT
        if source != SOURCE_GRAD:
            accepted.model = False
        accepted.t_taken = found.t
        return accepted, evals, source


def _upgrade_state(state: dict, first: Tensor, arena_firsts: list[Tensor]) -> None:
    """Earlier versions' LBFGS state in today's layout (docs/design.md, "LBFGS"):

    - version 0.2: ``gram`` ``[2m, 2m + 1]`` (``[S; Y] [S; Y; g]^T``), the ring as
      ``history_s``/``history_y`` beside the per-element state, ``direction`` holding
      the last step itself, ``direction_coefficients`` and ``staged_alpha``;
    - version 0.1: ``gram`` ``[3, m, m]`` as today with ``ring_grad_dots`` beside it, the
      same ring and ``direction``.

    The Gram blocks are read out of the old matrix (unheld slots are masked by
    ``pair_count`` today); the ring keeps its keys; ``direction`` held the step, so
    ``step_size`` is 1."""
    model = state.get(first, {})
    gram = model.get("gram")
    old = False
    if isinstance(gram, Tensor) and gram.dim() == 2:
        m = gram.shape[0] // 2
        g = gram.to(torch.float64)
        model["gram"] = torch.stack([g[:m, :m], g[:m, m : 2 * m], g[m : 2 * m, m : 2 * m]]).clone()
        old = True
    for key in ("ring_grad_dots", "direction_coefficients", "staged_alpha"):
        if key in model:
            model.pop(key)
            old = True
    for p in arena_firsts:
        p_state = state.get(p)
        if p_state is None:
            continue
        if old and "direction" in p_state:
            p_state.setdefault("step_size", 1.0)
