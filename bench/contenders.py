"""Everything a benchmark compares: MLBFGS on each backend and its peers.

A :class:`Contender` builds, from fresh parameters (with gradients) and a
:class:`~bench.problem.History`, an object whose ``step()`` is one optimizer
step in steady state: the quasi-Newton ones start with ``m`` pairs held and
are past their warm-up, so the timed step is the one training repeats.

``floor_bytes(N, m)`` is the fewest bytes the contender's algorithm must move
per step in float32 (each tensor read or written once): a step at copy
bandwidth would take ``floor_bytes / bandwidth``. ``state_bytes(N, m)`` and
``step_bytes(N, m)`` are what it holds between steps and what a build or a step
allocates on top, for the memory plan of :mod:`bench.planner`; ``step_slowdown``
and ``step_overhead_s`` its guess of a step's time on a GPU, for the time plan.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from mlbfgs_fused import MLBFGS
from mlbfgs_fused.reference import ReferenceGroup

from .baselines import AuthorsStyleMLBFGS, TorchLBFGSDirection
from .problem import History

# The authors' published settings (also used by bench.train).
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, update_period=50)
# Step count the steady state pretends to be at: past warm-up, far from a pair update.
STEADY_STEP = 10 * HYPER["update_period"] + 1


def mlbfgs_floor_bytes(n: int, m: int) -> int:
    """docs/design.md, "Byte budget": theta, g, P, G, buf and the 2m history rows."""
    return (16 * m + 44) * n


def mlbfgs_bf16_floor_bytes(n: int, m: int) -> int:
    """The same with a bfloat16 history: its 2m rows at 2 bytes."""
    return (8 * m + 44) * n


def lbfgs_floor_bytes(n: int, m: int) -> int:
    """Two reads of g and the 2m history rows, d written, theta read and written."""
    return (16 * m + 20) * n


def mlbfgs_state_bytes(history_element_bytes: int = 4, scratch_vectors: int = 0) -> Callable[[int, int], int]:
    """Its copy of the parameters and gradients (8 N), the five per-element state vectors
    (20 N), the 2m history rows, any scratch vectors (the foreach backend's two), and
    for the fused backends' chunk tables, partial sums, Gram matrices and counters
    (under 1 byte per parameter) 1 N + 64 KiB."""
    return lambda n, m: (29 + 4 * scratch_vectors) * n + 2 * m * history_element_bytes * n + (64 << 10)


def per_param_bytes(bytes_per_param: int) -> Callable[[int, int], int]:
    return lambda n, m: bytes_per_param * n


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ours", "mL-BFGS peer", "L-BFGS peer", "first-order", "out-of-place reference"
    build: Callable[[list[Tensor], History], object]
    floor_bytes: Callable[[int, int], int]
    # Bytes held between steps beyond the case's shared problem and history (its own
    # parameters and gradients included), and the most a build or a step allocates on top.
    state_bytes: Callable[[int, int], int]
    step_bytes: Callable[[int, int], int]
    mutates_grad: bool = False  # step() overwrites .grad: restore it between timed calls
    shares_history: bool = False  # keeps views of the case's history instead of a copy
    # Time plan (bench.planner.step_seconds): a step on a GPU takes about ``step_slowdown``
    # times its floor bytes at copy bandwidth, plus ``step_overhead_s`` of launches and host
    # work. Guesses, on the slow side; a GPU run's step_compare.json corrects them.
    step_slowdown: float = 1.5
    step_overhead_s: float = 3e-4


# -- MLBFGS -----------------------------------------------------------------------
def load_mlbfgs_steady_state(opt: MLBFGS, history: History, step: int = STEADY_STEP) -> None:
    """Fill a one-block MLBFGS's state (the layout of ``optimizer.state``, shared by
    every backend) with a full history, its Gram matrices and random EMAs,
    snapshots and momentum, as after ``step`` steps."""
    (group,) = opt.param_groups
    m = group["history_size"]
    blocks = [b for p in group["params"] for b in opt.block_states(p)]
    if len(blocks) != 1 or blocks[0]["history_s"].shape != history.S.shape:
        raise ValueError("the benchmark state loader handles one block spanning the group")
    (block,) = blocks
    with torch.no_grad():
        block["history_s"].copy_(history.S)
        block["history_y"].copy_(history.Y)
        S, Y = history.S, history.Y
        gram = torch.stack([S @ S.T, S @ Y.T, Y @ Y.T]).double()
        block["gram"].copy_(gram)
        block["pair_count"].fill_(m)
        block["step"].fill_(step)
        for p in group["params"]:
            for key in ("momentum_buffer", "param_ema", "grad_ema", "param_snapshot", "grad_snapshot"):
                opt.state[p][key].copy_(torch.randn_like(p))


def build_mlbfgs(backend: str, **options) -> Callable[[list[Tensor], History], MLBFGS]:
    def build(params, history):
        opt = MLBFGS(params, history_size=history.m, backend=backend, **{**HYPER, **options})
        grads = [p.grad.clone() for p in params]
        opt.step()  # creates the state
        with torch.no_grad():
            for p, g, in zip(params, grads):
                p.grad.copy_(g)
        load_mlbfgs_steady_state(opt, history)
        return opt

    return build


def mlbfgs_backend_works(backend: str, device: torch.device, warn: bool = True, **options) -> bool:
    """Choose backends (and options, e.g. ``variant``) by trying: a three-step run on a tiny problem."""
    try:
        p = torch.nn.Parameter(torch.randn(64, device=device))
        opt = MLBFGS([p], backend=backend, update_period=1, history_size=2, **options)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        return bool(torch.isfinite(p).all())
    except Exception as exc:  # noqa: BLE001 -- any failure means "not available here"
        if warn and (device.type == "cuda" or backend != "triton"):
            warnings.warn(f"MLBFGS backend {backend!r} {options or ''} left out on {device}: {exc!r}", stacklevel=2)
        return False


class GraphReplayed:
    """An optimizer whose ``step()`` replays one step captured in a CUDA graph (the way
    torch.optim's ``capturable`` optimizers are used): warm-up on a side stream, capture."""

    def __init__(self, optimizer, warmup: int = 3):
        self.optimizer = optimizer
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # builds the plans, binds the gradients, compiles
                optimizer.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            optimizer.step()

    def step(self) -> None:
        self.graph.replay()


def build_mlbfgs_graph(backend: str, **options) -> Callable[[list[Tensor], History], GraphReplayed]:
    """A capturable MLBFGS (``lr`` a device tensor) in steady state, its step captured.
    The warm-up steps advance the step counter by 3: the timed replays stay clear of a
    pair step (every ``update_period`` = 50 steps after ``STEADY_STEP``)."""

    def build(params, history):
        lr = torch.tensor(HYPER["lr"], device=params[0].device)
        return GraphReplayed(build_mlbfgs(backend, capturable=True, lr=lr, **options)(params, history))

    return build


def graph_capture_works(backend: str, device: torch.device) -> bool:
    """Capture and replay a tiny problem's step, as the benchmark does."""
    if device.type != "cuda":
        return False
    try:
        p = torch.nn.Parameter(torch.randn(64, device=device))
        p.grad = torch.randn_like(p)
        opt = MLBFGS([p], lr=torch.tensor(0.1, device=device), backend=backend, update_period=2,
                     history_size=2, capturable=True)
        replayed = GraphReplayed(opt)
        for _ in range(3):
            replayed.step()
        torch.cuda.synchronize(device)
        return bool(torch.isfinite(p).all())
    except Exception as exc:  # noqa: BLE001 -- any failure means "not available here"
        warnings.warn(f"CUDA graph capture of MLBFGS backend {backend!r} left out: {exc!r}", stacklevel=2)
        return False


# -- peers ------------------------------------------------------------------------
def build_authors(params, history):
    opt = AuthorsStyleMLBFGS(params, history_size=history.m, **HYPER)
    s_rows, y_rows = history.rows()
    opt.load_steady_state(s_rows, y_rows, STEADY_STEP)
    return opt


def build_torch_lbfgs(params, history):
    opt = TorchLBFGSDirection(params, lr=HYPER["lr"], history_size=history.m)
    s_rows, y_rows = history.rows()
    opt.load_steady_state(s_rows, y_rows)
    return opt


class ReferenceStep:
    """The float64 reference's out-of-place formulation run in float32: flat copies
    in, a new tensor for every intermediate, the result copied back."""

    def __init__(self, params, history: History):
        self.params = params
        theta = torch.cat([p.detach().view(-1) for p in params])
        self.group = ReferenceGroup(theta, [0, theta.numel()], dtype=theta.dtype, history_size=history.m, **HYPER)
        block = self.group.blocks[0]
        block.pairs = list(zip(*history.rows()))
        block.param_snapshot, block.grad_snapshot = torch.randn_like(theta), torch.randn_like(theta)
        self.group.param_ema, self.group.grad_ema = torch.randn_like(theta), torch.randn_like(theta)
        self.group.buf = torch.randn_like(theta)
        self.group.t = STEADY_STEP

    @torch.no_grad()
    def step(self):
        self.group.step(torch.cat([p.grad.view(-1) for p in self.params]))
        torch._foreach_copy_(
            [p.view(-1) for p in self.params], list(self.group.theta.split([p.numel() for p in self.params]))
        )


def build_torch_optimizer(cls, **kwargs):
    def build(params, history):
        opt = cls(params, **kwargs)
        opt.step()  # creates the state: a steady-state step from here on
        return opt

    return build


def fused_works(cls, device: torch.device) -> bool:
    """Whether torch's ``fused=True`` implementation of ``cls`` runs on ``device``."""
    try:
        p = torch.nn.Parameter(torch.randn(8, device=device))
        p.grad = torch.randn_like(p)
        cls([p], lr=1e-3, fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def adamw_works(device: torch.device, fused: bool) -> bool:
    return fused_works(torch.optim.AdamW, device) if fused else True


# Measured on the CPU with bench.memory's tracker (tests/test_bench_planner.py keeps
# them upper bounds): the peers' state beyond their own parameters and gradients and
# their transients per step, in bytes per float32 parameter.
AUTHORS_STATE, AUTHORS_STEP = 8 + 20, 24  # four EMAs/snapshots, momentum; cat, clones, q
TORCH_LBFGS_STATE, TORCH_LBFGS_STEP = 8 + 8, 24  # d, prev_flat_grad; flat_grad, y, s, q
REFERENCE_STATE, REFERENCE_STEP = 8 + 24, 48  # theta, five state vectors; out-of-place temporaries


def mlbfgs_contender(name: str, backend: str, build=None, history_dtype=None, **options) -> Contender:
    """One of ours on ``backend``: its floor and memory follow its history dtype (and the
    foreach backend's two scratch vectors)."""
    narrow = history_dtype is not None and history_dtype.itemsize == 2
    if history_dtype is not None:
        options["history_dtype"] = history_dtype
    foreach = backend == "foreach"
    return Contender(
        name, "ours", build or build_mlbfgs(backend, **options),
        mlbfgs_bf16_floor_bytes if narrow else mlbfgs_floor_bytes,
        state_bytes=mlbfgs_state_bytes(2 if narrow else 4, scratch_vectors=2 if foreach else 0),
        step_bytes=per_param_bytes(8),  # the build: a gradient copy, a random state tensor
        # foreach: a dozen passes over the vectors and two over the history, ~50 launches
        step_slowdown=5.0 if foreach else 1.5, step_overhead_s=3e-3 if foreach else 3e-4,
    )


def contenders(device: torch.device, include_reference: bool = True) -> list[Contender]:
    """Every contender that runs on ``device``, ours first (the default backend first).
    The Triton backend is left out on the CPU: its interpreter is far too slow to time.
    On CUDA the default backend also runs with a bfloat16 history, with
    ``variant="released"`` and captured in a CUDA graph (replayed). The CUDA C++ backend
    is not captured: its ops copy the address table from a pinned host buffer allocated
    per call, which a replay reads again (bench/README.md says when that is sound).
    Each backend and option is chosen by trying it (:func:`contender_list` makes the list)."""
    native = "cuda" if device.type == "cuda" else "cpp"
    backends = ("triton", native, "foreach") if device.type == "cuda" else (native, "foreach")
    works = [b for b in backends if mlbfgs_backend_works(b, device)]
    # The authors' math on our fastest backend that implements it (not the CUDA C++ one).
    released = next((b for b in works if mlbfgs_backend_works(b, device, warn=False, variant="released")), None)
    return contender_list(
        device.type, works, released=released,
        graph="triton" in works and graph_capture_works("triton", device),
        adamw_fused=fused_works(torch.optim.AdamW, device), sgd_fused=fused_works(torch.optim.SGD, device),
        include_reference=include_reference,
    )


def contender_list(device_type: str, works, released: str | None, graph: bool, adamw_fused: bool,
                   sgd_fused: bool, include_reference: bool = True) -> list[Contender]:
    """The contenders given what runs: the MLBFGS backends that ``works`` (in order of
    preference), the one that runs ``variant="released"``, whether a Triton step can be
    captured in a CUDA graph and whether torch's fused AdamW and SGD run. Tries nothing,
    so a plan can be made for a device that is not here (:func:`planned_contenders`)."""
    out = []
    native = "cuda" if device_type == "cuda" else "cpp"
    if "triton" in works:
        out.append(mlbfgs_contender("mlbfgs-triton", "triton"))
        out.append(mlbfgs_contender("mlbfgs-triton-bf16-history", "triton", history_dtype=torch.bfloat16))
        if graph:
            graphed = mlbfgs_contender("mlbfgs-triton-graph", "triton", build=build_mlbfgs_graph("triton"))
            out.append(replace(graphed, step_overhead_s=5e-5))  # one replay: no Python, no launch gaps
    if native in works:
        out.append(mlbfgs_contender(f"mlbfgs-{native}", native))
        out.append(mlbfgs_contender(f"mlbfgs-{native}-bf16-history", native, history_dtype=torch.bfloat16))
    if released is not None:
        out.append(mlbfgs_contender(f"mlbfgs-{released}-released", released, variant="released"))
    if "foreach" in works:
        out.append(mlbfgs_contender("mlbfgs-foreach", "foreach"))
    # Peers: flattening copies and a host read per two-loop iteration (authors), 4m kernels
    # with host reads in between (torch), out-of-place temporaries (reference).
    out.append(Contender("authors-style", "mL-BFGS peer", build_authors, mlbfgs_floor_bytes,
                         per_param_bytes(AUTHORS_STATE), per_param_bytes(AUTHORS_STEP),
                         mutates_grad=True, shares_history=True, step_slowdown=10.0, step_overhead_s=1e-2))
    out.append(Contender("torch-lbfgs-direction", "L-BFGS peer", build_torch_lbfgs, lbfgs_floor_bytes,
                         per_param_bytes(TORCH_LBFGS_STATE), per_param_bytes(TORCH_LBFGS_STEP),
                         shares_history=True, step_slowdown=4.0, step_overhead_s=5e-3))
    if include_reference:
        out.append(Contender("reference-fp32", "out-of-place reference", ReferenceStep, mlbfgs_floor_bytes,
                             per_param_bytes(REFERENCE_STATE), per_param_bytes(REFERENCE_STEP),
                             shares_history=True, step_slowdown=10.0, step_overhead_s=1e-2))
    wd = HYPER["weight_decay"]
    adamw = dict(floor_bytes=per_param_bytes(28),  # p, g, exp_avg, exp_avg_sq read; p, exp_avg, exp_avg_sq written
                 state_bytes=per_param_bytes(16), step_bytes=per_param_bytes(8))
    out.append(Contender("adamw-foreach", "first-order",
                         build_torch_optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=wd, foreach=True),
                         step_slowdown=2.5, step_overhead_s=1e-3, **adamw))
    if adamw_fused:
        out.append(Contender("adamw-fused", "first-order",
                             build_torch_optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=wd, fused=True), **adamw))
    sgd = dict(floor_bytes=per_param_bytes(20),  # p, g, buf read; p, buf written
               state_bytes=per_param_bytes(12), step_bytes=per_param_bytes(8))
    out.append(Contender("sgd-momentum", "first-order",
                         build_torch_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=wd, foreach=True),
                         step_slowdown=2.5, step_overhead_s=1e-3, **sgd))
    if sgd_fused:
        out.append(Contender("sgd-fused", "first-order",
                             build_torch_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=wd, fused=True),
                             **sgd))
    return out


def planned_contenders(device_type: str = "cuda") -> list[Contender]:
    """The contenders a machine of ``device_type`` gives when every backend and option
    runs there (on CUDA: Triton, the CUDA C++ kernels, foreach, graph capture, torch's
    fused optimizers): what a plan for that machine starts from, made anywhere."""
    if device_type == "cuda":
        return contender_list("cuda", ("triton", "cuda", "foreach"), released="triton", graph=True,
                              adamw_fused=True, sgd_fused=True)
    return contender_list(device_type, ("cpp", "foreach"), released="cpp", graph=False,
                          adamw_fused=True, sgd_fused=True)


def ours(contender_list: list[Contender]) -> Contender:
    """Our default backend on the device: Triton (CUDA) or C++ (CPU) when it runs, else foreach."""
    return next(c for c in contender_list if c.kind == "ours")
