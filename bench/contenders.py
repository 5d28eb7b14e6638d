"""Everything a benchmark compares: MLBFGS on each backend and its peers.

A :class:`Contender` builds, from fresh parameters (with gradients) and a
:class:`~bench.problem.History`, an object whose ``step()`` is one optimizer
step in steady state: the quasi-Newton ones start with ``m`` pairs held and
are past their warm-up, so the timed step is the one training repeats.

``floor_bytes(N, m)`` is the fewest bytes the contender's algorithm must move
per step in float32 (each tensor read or written once): a step at copy
bandwidth would take ``floor_bytes / bandwidth``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ours", "mL-BFGS peer", "L-BFGS peer", "first-order", "out-of-place reference"
    build: Callable[[list[Tensor], History], object]
    floor_bytes: Callable[[int, int], int]
    mutates_grad: bool = False  # step() overwrites .grad: restore it between timed calls


# -- MLBFGS -----------------------------------------------------------------------
def load_mlbfgs_steady_state(opt: MLBFGS, history: History, step: int = STEADY_STEP) -> None:
    """Fill a one-block MLBFGS's state (the layout of ``optimizer.state``, shared by
    every backend) with a full history, its Gram matrices and random EMAs,
    snapshots and momentum, as after ``step`` steps."""
    (group,) = opt.param_groups
    m = group["history_size"]
    blocks = [b for p in group["params"] for b in opt.state[p].get("blocks", [])]
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
        opt = MLBFGS(params, history_size=history.m, backend=backend, **HYPER, **options)
        grads = [p.grad.clone() for p in params]
        opt.step()  # creates the state
        with torch.no_grad():
            for p, g, in zip(params, grads):
                p.grad.copy_(g)
        load_mlbfgs_steady_state(opt, history)
        return opt

    return build


def mlbfgs_backend_works(backend: str, device: torch.device) -> bool:
    """Choose backends by trying: a two-step run on a tiny problem."""
    try:
        p = torch.nn.Parameter(torch.randn(64, device=device))
        opt = MLBFGS([p], backend=backend, update_period=1, history_size=2)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        return bool(torch.isfinite(p).all())
    except Exception as exc:  # noqa: BLE001 -- any failure means "not available here"
        if device.type == "cuda" or backend != "triton":
            warnings.warn(f"MLBFGS backend {backend!r} left out on {device}: {exc!r}", stacklevel=2)
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


def adamw_works(device: torch.device, fused: bool) -> bool:
    try:
        p = torch.nn.Parameter(torch.randn(8, device=device))
        p.grad = torch.randn_like(p)
        torch.optim.AdamW([p], fused=fused, foreach=None if fused else True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def contenders(device: torch.device, include_reference: bool = True) -> list[Contender]:
    """Every contender that runs on ``device``, ours first (the default backend first).
    The Triton backend is left out on the CPU: its interpreter is far too slow to time."""
    out = []
    if device.type == "cuda" and mlbfgs_backend_works("triton", device):
        out.append(Contender("mlbfgs-triton", "ours", build_mlbfgs("triton"), mlbfgs_floor_bytes))
    native = "cuda" if device.type == "cuda" else "cpp"
    if mlbfgs_backend_works(native, device):
        out.append(Contender(f"mlbfgs-{native}", "ours", build_mlbfgs(native), mlbfgs_floor_bytes))
        out.append(
            Contender(
                f"mlbfgs-{native}-bf16-history", "ours",
                build_mlbfgs(native, history_dtype=torch.bfloat16), mlbfgs_bf16_floor_bytes,
            )
        )
    if mlbfgs_backend_works("foreach", device):
        out.append(Contender("mlbfgs-foreach", "ours", build_mlbfgs("foreach"), mlbfgs_floor_bytes))
    out.append(Contender("authors-style", "mL-BFGS peer", build_authors, mlbfgs_floor_bytes, mutates_grad=True))
    out.append(Contender("torch-lbfgs-direction", "L-BFGS peer", build_torch_lbfgs, lbfgs_floor_bytes))
    if include_reference:
        out.append(Contender("reference-fp32", "out-of-place reference", ReferenceStep, mlbfgs_floor_bytes))
    wd = HYPER["weight_decay"]
    out.append(
        Contender(
            "adamw-foreach", "first-order",
            build_torch_optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=wd, foreach=True),
            lambda n, m: 28 * n,  # p, g, exp_avg, exp_avg_sq read; p, exp_avg, exp_avg_sq written
        )
    )
    if adamw_works(device, fused=True):
        out.append(
            Contender(
                "adamw-fused", "first-order",
                build_torch_optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=wd, fused=True),
                lambda n, m: 28 * n,
            )
        )
    out.append(
        Contender(
            "sgd-momentum", "first-order",
            build_torch_optimizer(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=wd, foreach=True),
            lambda n, m: 20 * n,  # p, g, buf read; p, buf written
        )
    )
    return out


def ours(contender_list: list[Contender]) -> Contender:
    """Our default backend on the device: Triton (CUDA) or C++ (CPU) when it runs, else foreach."""
    return next(c for c in contender_list if c.kind == "ours")
