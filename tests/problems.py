"""Random optimisation problems shared by the backend tests.

A :class:`Scenario` describes parameter groups (odd shapes, per-group
hyperparameters and block layouts) and a noisy quadratic per group,
``grad = A (theta - theta_star) + noise_t``, with fresh random ``A``,
``theta_star`` and noise drawn from the scenario's seed. Each implementation
under test computes its gradients from its own parameters, so trajectories are
compared closed-loop, exactly as training would run them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import torch

from mlbfgs_fused import MLBFGS
from mlbfgs_fused._state.layout import arena_layout
from mlbfgs_fused.reference import ReferenceGroup
from mlbfgs_fused.reference.mlbfgs import DEFAULTS as REFERENCE_HYPERPARAMETERS


@dataclass
class Scenario:
    shapes: list[list[tuple[int, ...]]]
    hyper: list[dict]
    steps: int
    seed: int = 0
    # (group, param index) -> steps at which that parameter has no gradient
    absent: dict[tuple[int, int], range] = field(default_factory=dict)
    # steps at which a gradient holds a NaN: every group's, or only those of ``nan_groups``
    nan_steps: tuple[int, ...] = ()
    nan_groups: tuple[int, ...] | None = None
    nan_value: float = float("nan")  # what those steps put there (an infinity is as non-finite)
    noise: float = 0.3

    def __post_init__(self):
        gen = torch.Generator().manual_seed(self.seed)
        self.init, self.A, self.theta_star, self.noise_seq = [], [], [], []
        for shapes in self.shapes:
            n = sum(_numel(s) for s in shapes)
            self.init.append(torch.randn(n, generator=gen, dtype=torch.float64))
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            eig = torch.logspace(-0.5, 0.8, n, dtype=torch.float64)
            self.A.append(q @ torch.diag(eig) @ q.T)
            self.theta_star.append(torch.randn(n, generator=gen, dtype=torch.float64))
            self.noise_seq.append(
                self.noise * torch.randn(self.steps, n, generator=gen, dtype=torch.float64)
            )

    def grad(self, group: int, theta: torch.Tensor, step: int) -> torch.Tensor:
        """Gradient at ``theta`` (natural order, float64) at ``step``."""
        g = self.A[group] @ (theta.double() - self.theta_star[group]) + self.noise_seq[group][step]
        if step in self.nan_steps and (self.nan_groups is None or group in self.nan_groups):
            g = g.clone()
            g[len(g) // 2] = self.nan_value
        return g

    def has_grad(self, group: int, step: int) -> list[bool]:
        return [
            step not in self.absent.get((group, i), range(0))
            for i in range(len(self.shapes[group]))
        ]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_params(sc: Scenario, dtype=torch.float32, device="cpu") -> list[list[torch.nn.Parameter]]:
    groups = []
    for shapes, init in zip(sc.shapes, sc.init):
        chunks = init.split([_numel(s) for s in shapes])
        groups.append(
            [
                torch.nn.Parameter(c.reshape(s).to(dtype=dtype, device=device).clone())
                for c, s in zip(chunks, shapes)
            ]
        )
    return groups


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double().cpu() for p in params])


def set_grads(sc: Scenario, groups, step: int) -> None:
    for gi, params in enumerate(groups):
        g = sc.grad(gi, flat(params), step)
        present = sc.has_grad(gi, step)
        for p, chunk, here in zip(params, g.split([p.numel() for p in params]), present):
            p.grad = chunk.reshape(p.shape).to(p.dtype).to(p.device).clone() if here else None


def make_optimizer(sc: Scenario, groups, **kwargs) -> MLBFGS:
    param_groups = [{"params": params, **h} for params, h in zip(groups, sc.hyper)]
    return MLBFGS(param_groups, **kwargs)


def run_optimizer(sc: Scenario, opt: MLBFGS, groups, start: int = 0, stop: int | None = None) -> None:
    for step in range(start, sc.steps if stop is None else stop):
        set_grads(sc, groups, step)
        opt.step()


def run_scenario(sc: Scenario, dtype=torch.float32, device="cpu", stop: int | None = None, **opt_kwargs):
    """Fresh parameters and an MLBFGS (``opt_kwargs`` choose the backend) run through
    ``sc`` up to ``stop`` (default: the end). Returns ``(optimizer, parameter groups)``."""
    groups = build_params(sc, dtype, device)
    opt = make_optimizer(sc, groups, **opt_kwargs)
    run_optimizer(sc, opt, groups, stop=stop)
    return opt, groups


class ReferenceRun:
    """The float64 reference on the same scenario, in each group's arena order."""

    def __init__(self, sc: Scenario, blocks_per_group: list):
        self.sc = sc
        self.groups, self.perms = [], []
        for gi, shapes in enumerate(sc.shapes):
            numels = [_numel(s) for s in shapes]
            layout = arena_layout(numels, blocks_per_group[gi])
            offsets = [sum(numels[:i]) for i in range(len(numels))]
            perm = torch.cat([torch.arange(offsets[i], offsets[i] + numels[i]) for i in layout.order])
            hyper = reference_hyper(sc.hyper[gi])
            self.groups.append(ReferenceGroup(sc.init[gi][perm], layout.block_bounds, **hyper))
            self.perms.append(perm)

    def natural(self, gi: int) -> torch.Tensor:
        theta = torch.empty_like(self.groups[gi].theta)
        theta[self.perms[gi]] = self.groups[gi].theta
        return theta

    def run(self, start: int = 0, stop: int | None = None) -> None:
        for step in range(start, self.sc.steps if stop is None else stop):
            grads, masks = [], []
            for gi, ref in enumerate(self.groups):
                g = self.sc.grad(gi, self.natural(gi), step)
                numels = [_numel(s) for s in self.sc.shapes[gi]]
                mask = torch.cat(
                    [torch.full((n,), here) for n, here in zip(numels, self.sc.has_grad(gi, step))]
                )
                grads.append(g[self.perms[gi]])
                masks.append(mask[self.perms[gi]])
            # One non-finite effective gradient anywhere skips every group's step.
            finite = all(
                torch.isfinite(ref.effective_gradient(g, mask)).all()
                for ref, g, mask in zip(self.groups, grads, masks)
            )
            for ref, g, mask in zip(self.groups, grads, masks):
                ref.step(g, mask, skip=not finite)


def reference_hyper(hyper: dict) -> dict:
    """A group's settings that the reference's math reads: not ``blocks`` (the bounds say
    it), nor a group's backend or storage dtypes."""
    return {k: v for k, v in hyper.items() if k in REFERENCE_HYPERPARAMETERS or k == "variant"}


_REFERENCE_RUNS: dict[str, ReferenceRun] = {}


def reference_run(sc: Scenario) -> ReferenceRun:
    """The reference run through the whole of ``sc``: made once per process for each
    scenario (it depends on neither the backend nor the dtypes under test); read it,
    never step it."""
    hyper = [
        {k: (v.tolist(), str(v.dtype)) if isinstance(v, torch.Tensor) else v for k, v in reference_hyper(h).items()}
        for h in sc.hyper
    ]
    blocks = [h.get("blocks", "group") for h in sc.hyper]
    key = repr((sc.shapes, hyper, blocks, sc.steps, sc.seed, sorted(sc.absent.items()), sc.nan_steps,
                sc.nan_groups, sc.nan_value, sc.noise))
    ref = _REFERENCE_RUNS.get(key)
    if ref is None:
        ref = ReferenceRun(sc, [h.get("blocks", "group") for h in sc.hyper])
        ref.run()
        _REFERENCE_RUNS[key] = ref
    return ref


def run_against_reference(sc: Scenario, dtype=torch.float32, device="cpu", **opt_kwargs):
    """Run MLBFGS (``opt_kwargs`` choose the backend) and the reference on ``sc``.

    Returns ``(optimizer, parameter groups, reference run, relative errors per group)``."""
    opt, groups = run_scenario(sc, dtype, device, **opt_kwargs)
    ref = reference_run(sc)
    errors = [relative_error(flat(params), ref.natural(gi)) for gi, params in enumerate(groups)]
    return opt, groups, ref, errors


def state_tensors(opt: MLBFGS) -> list[torch.Tensor]:
    """Every tensor of ``opt.state`` in a fixed order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in sorted(opt.state[p].items()):
                if key == "blocks":
                    out += [block[k] for block in value for k in sorted(block)]
                else:
                    out.append(value)
    return out


def resume_from_checkpoint(sc: Scenario, save_at: int, first: str, second: str, device="cpu", **kwargs):
    """Run backend ``first`` to ``save_at``, checkpoint through ``torch.save`` (loaded with
    ``map_location="cpu"``), finish the run, and finish it again from the checkpoint on a
    freshly built ``second`` optimizer over fresh parameters.

    Returns ``((opt, groups), (opt2, groups2))``."""
    opt, groups = run_scenario(sc, torch.float32, device, stop=save_at, backend=first, **kwargs)
    buffer = io.BytesIO()
    torch.save({"params": [[p.detach().clone() for p in g] for g in groups], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu", weights_only=True)
    run_optimizer(sc, opt, groups, start=save_at)

    groups2 = build_params(sc, torch.float32, device)
    with torch.no_grad():
        for g2, saved in zip(groups2, checkpoint["params"]):
            for p, v in zip(g2, saved):
                p.copy_(v)
    opt2 = make_optimizer(sc, groups2, backend=second, **kwargs)
    opt2.load_state_dict(checkpoint["opt"])
    run_optimizer(sc, opt2, groups2, start=save_at)
    return (opt, groups), (opt2, groups2)


def assert_bit_identical(run1, run2) -> None:
    """Parameters and every state tensor equal to the bit, dtypes included."""
    (opt, groups), (opt2, groups2) = run1, run2
    for g1, g2 in zip(groups, groups2):
        for p1, p2 in zip(g1, g2):
            assert torch.equal(p1, p2)
    s1, s2 = state_tensors(opt), state_tensors(opt2)
    assert len(s1) == len(s2) > 0
    for a, b in zip(s1, s2):
        assert a.dtype == b.dtype and torch.equal(a, b)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def standard_scenario(blocks, steps: int = 40, seed: int = 0, **overrides) -> Scenario:
    """Two groups of odd shapes, different lr and weight decay, short update
    period so the history of 3 pairs wraps; a parameter whose gradient is absent
    through the first pair update makes that (tensor) block skip its first pair."""
    common = dict(
        history_size=3, update_period=4, ema_decay=(0.9, 0.95), pair_momentum=0.5, blocks=blocks
    )
    common.update(overrides)
    return Scenario(
        shapes=[[(7, 3), (5,), (2, 3, 2)], [(11,), (3, 4)]],
        hyper=[
            dict(lr=0.05, weight_decay=0.01, **common),
            dict(lr=0.02, weight_decay=0.0, momentum=0.5, **common),
        ],
        steps=steps,
        seed=seed,
        absent={(0, 1): range(0, 9)},
    )
