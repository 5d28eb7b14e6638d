"""In-place audit: which optimizers keep their parameters and state where they are.

For ``torch.optim.SGD`` (momentum), ``Adam``/``AdamW`` (for-loop, foreach,
fused), ``LBFGS`` and ``MLBFGS`` on a small model-like problem with gradients
from a quadratic, three tracked steps after a warm-up record: whether every
parameter and every state tensor keeps its storage (``data_ptr()``) across
steps, and the temporaries at least as large as the smallest weight tensor
that a step allocates (from :class:`~bench.memory.AllocationTracker`), in
units of the whole parameter count N.
"""

from __future__ import annotations

from collections import Counter

import torch

from mlbfgs_fused import MLBFGS

from .contenders import adamw_works, mlbfgs_backend_works
from .memory import AllocationTracker
from .problem import parameter_sizes

WARMUP_STEPS, TRACKED_STEPS = 4, 3


def _optimizer_factories(device: torch.device) -> dict:
    def adam_family(cls):
        variants = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True)}
        if adamw_works(device, fused=True):
            variants["fused"] = dict(fused=True)
        return {f"{cls.__name__} ({v})": (lambda ps, cls=cls, kw=kw: cls(ps, lr=1e-3, **kw)) for v, kw in variants.items()}

    factories = {
        "SGD momentum (for-loop)": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=False),
        "SGD momentum (foreach)": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
        **adam_family(torch.optim.Adam),
        **adam_family(torch.optim.AdamW),
        "LBFGS (max_iter=1)": lambda ps: torch.optim.LBFGS(ps, lr=0.1, max_iter=1, history_size=3),
    }
    backends = ["triton", "foreach"] if device.type == "cuda" else ["foreach"]
    for backend in backends:
        if mlbfgs_backend_works(backend, device):
            # update_period=2: the tracked steps include pair updates and plain steps
            factories[f"MLBFGS ({backend})"] = lambda ps, b=backend: MLBFGS(
                ps, lr=0.01, history_size=3, update_period=2, backend=b
            )
    return factories


def _state_tensors(opt) -> dict[str, torch.Tensor]:
    """Every tensor in ``opt.state``, named ``param_index.key[.list_index...]``."""
    index = {id(p): i for i, g in enumerate(opt.param_groups) for i, p in enumerate(g["params"])}
    found = {}

    def walk(name, value):
        if isinstance(value, torch.Tensor):
            found[name] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{name}[{i}]", v)

    for p, st in opt.state.items():
        walk(f"p{index.get(id(p), '?')}", st)
    return found


def audit_one(name: str, factory, device: torch.device, numel: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    sizes = parameter_sizes(numel)
    params = [torch.nn.Parameter(torch.randn(k, generator=gen, device=device)) for k in sizes]
    curvature = [0.5 + torch.rand(k, generator=gen, device=device) for k in sizes]
    for p in params:
        p.grad = torch.zeros_like(p)

    grads = [p.grad for p in params]

    @torch.no_grad()
    def closure():  # gradients of sum(a * p^2 / 2), written in place: no allocation of its own
        torch._foreach_copy_(grads, params)
        torch._foreach_mul_(grads, curvature)
        return 1.0

    opt = factory(params)
    for _ in range(WARMUP_STEPS):
        closure()
        opt.step(closure) if isinstance(opt, torch.optim.LBFGS) else opt.step()
    threshold = min(sizes[::2])  # the smallest weight tensor
    param_moved, moved_state, list_state = False, set(), set()
    temporaries: Counter = Counter()
    temp_bytes = []
    for _ in range(TRACKED_STEPS):
        closure()
        before_params = [p.data_ptr() for p in params]
        before_state = {k: t.data_ptr() for k, t in _state_tensors(opt).items()}
        with AllocationTracker() as tracker:
            opt.step(closure) if isinstance(opt, torch.optim.LBFGS) else opt.step()
        param_moved |= before_params != [p.data_ptr() for p in params]
        after_state = {k: t.data_ptr() for k, t in _state_tensors(opt).items()}
        for key, ptr in before_state.items():
            if after_state.get(key) == ptr:
                continue
            state_name = key.split(".", 1)[1]
            if "[" in state_name:  # an entry of a Python list was replaced (LBFGS's history)
                list_state.add(state_name.split("[")[0])
            else:
                moved_state.add(state_name)
        large = [a for a in tracker.allocations if a.numel >= threshold]
        step_counts = Counter(a.op for a in large)
        for op, count in step_counts.items():
            temporaries[op] = max(temporaries[op], count)
        temp_bytes.append(sum(a.nbytes for a in large))
    state_keys = sorted({k.split(".", 1)[1] for k in _state_tensors(opt)})
    return {
        "optimizer": name,
        "params_keep_storage": not param_moved,
        "state_tensors": state_keys,
        "state_moved": sorted(moved_state),
        "state_lists": sorted(list_state),
        "large_temporaries_per_step": dict(sorted(temporaries.items())),
        "large_temporary_bytes_per_step_over_4N": max(temp_bytes) / (4 * numel),
    }


def run_audit(device: torch.device, numel: int = 1 << 16) -> dict:
    rows = [audit_one(name, factory, device, numel) for name, factory in _optimizer_factories(device).items()]
    return {"numel": numel, "param_sizes": parameter_sizes(numel), "rows": rows}


def format_audit(audit: dict) -> str:
    """The audit as a Markdown table."""
    lines = [
        "| optimizer | params keep storage | state tensors that moved | N-sized temporaries per step (op x count) | temporary bytes / 4N |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in audit["rows"]:
        moved = ", ".join(r["state_moved"]) or "none"
        if r["state_lists"]:
            moved += f" (+ entries replaced in Python lists: {', '.join(r['state_lists'])})"
        temps = ", ".join(f"{op.removeprefix('aten.')} x{c}" for op, c in r["large_temporaries_per_step"].items()) or "none"
        lines.append(
            f"| {r['optimizer']} | {'yes' if r['params_keep_storage'] else 'NO'} | {moved} | {temps} "
            f"| {r['large_temporary_bytes_per_step_over_4N']:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    from .machine import default_device

    print(format_audit(run_audit(default_device())))
