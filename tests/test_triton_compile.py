"""Every kernel launch the optimizer makes compiles for a real GPU (sm_90).

The interpreter runs the kernels as Python and lets through what the GPU
compiler rejects (plain globals read in @jit code, branches yielding different
types, ...). This test needs no GPU: a subprocess without ``TRITON_INTERPRET``
runs optimizer steps on CPU tensors with the launches captured instead of run,
then compiles each distinct launch with Triton's offline compiler down to a cubin.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlbfgs_fused.backends import triton as _triton

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    dict(dtype="float32"),
    dict(dtype="float32", history_dtype="bfloat16", weight_decay=0.1, maximize=True, blocks=7),
    dict(dtype="float64", history_size=1, normalize=False),
    dict(dtype="bfloat16", history_size=4, blocks="tensor", grad_scale=1024.0),
    dict(dtype="float16", weight_decay=0.1, variant="released"),
    # Sizes that are multiples of 16 elements: the ALIGNED specialization (vector loads).
    dict(dtype="float32", shapes=[[16, 8], [32]], blocks="tensor"),
    # The largest history the benchmarks time (m = 20: vectors of 32 slots).
    dict(dtype="float32", history_size=20, shapes=[[16, 8], [32]], blocks="tensor"),
    dict(dtype="float32", history_dtype="bfloat16", history_size=20),
]

# LBFGS (kernels/lbfgs_*.py): parameter dtype, history dtype, history size, sizes.
LBFGS_CONFIGS = [
    dict(dtype="float32", history_size=10),
    dict(dtype="float32", history_dtype="bfloat16", history_size=100, shapes=[[16, 8], [32]]),
    dict(dtype="float64", history_size=3, maximize=True),
    dict(dtype="float64", history_dtype="float32", history_size=100),
]

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction
from mlbfgs_fused import MLBFGS
from mlbfgs_fused.backends import triton as _triton

_triton.supported_devices = lambda: ["cuda", "cpu"]  # CPU tensors stand in for CUDA ones
launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))

for config in json.loads(sys.argv[1]):
    dtype = getattr(torch, config.pop("dtype"))
    history = config.pop("history_dtype", None)
    grad_scale = config.pop("grad_scale", None)
    shapes = config.pop("shapes", [[5, 3], [4]])
    params = [torch.nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in shapes]
    opt = MLBFGS(params, backend="triton", history_dtype=history and getattr(torch, history), **config)
    for p in params:
        p.grad = torch.randn_like(p)
    if grad_scale is not None:  # as GradScaler.step sets them
        opt.grad_scale, opt.found_inf = torch.tensor(grad_scale), torch.tensor(0.0)
    opt.step()

# LBFGS: every pass in every variant, called one at a time on the plan (the kernels do
# not run here, so the optimizer's own loop would stop at its first read).
from mlbfgs_fused import LBFGS
from mlbfgs_fused.backends._lbfgs import SOURCE_GRAD, SOURCE_KEPT, SOURCE_PREV
for config in json.loads(sys.argv[2]):
    dtype = getattr(torch, config.pop("dtype"))
    history = config.pop("history_dtype", None)
    shapes = config.pop("shapes", [[5, 3], [4]])
    params = [torch.nn.Parameter(torch.randn(*shape, dtype=dtype)) for shape in shapes]
    opt = LBFGS(params, backend="triton", line_search_fn="strong_wolfe",
                history_dtype=history and getattr(torch, history), **config)
    for p in params:
        p.grad = torch.randn_like(p)
    plan = opt.plan
    with torch.no_grad():
        plan.bind()
        for source in (SOURCE_GRAD, SOURCE_KEPT, SOURCE_PREV):
            for pair, ring in ((False, True), (True, True), (True, False)):
                plan.gradient_dots(source, [0.5], pair, ring)
        for pair, direction in ((False, False), (True, True), (False, True)):
            plan.two_loop(params[0].new_ones(()), pair, direction)
            plan.two_loop(None, pair, direction)
        for source in (SOURCE_GRAD, SOURCE_KEPT):
            plan.direction(source, [0.5], [0.25], True, True)
            plan.direction(source, [0.5], None, False, False)
        plan.push(SOURCE_GRAD, [0.5])
        plan.move([0.5], from_saved=True)
        plan.move([0.5], from_saved=False)

TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
         torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}

def type_of(value):
    if isinstance(value, torch.Tensor):
        return "*" + TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    raise TypeError(type(value))

target = GPUTarget("cuda", 90, 32)
from triton.backends.nvidia.compiler import get_ptxas
ptxas = get_ptxas(90).path
seen = set()
for fn, args, kwargs in launches:
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = values[param.name]
        else:
            signature[param.name] = type_of(values[param.name])
    key = (fn.__name__, str(signature), str(constexprs))
    if key not in seen:
        seen.add(key)
        compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
        assert compiled.asm["cubin"]
        ptx = compiled.asm["ptx"]
        vector = any(f"{op}.global.v{n}" in ptx for op in ("ld", "st") for n in (2, 4))
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            report = subprocess.run([ptxas, "-v", f"--gpu-name=sm_90a", f.name, "-o", os.devnull],
                                    capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", report)
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
        print("compiled", fn.__name__, values.get("ALIGNED", False), values.get("F64", False),
              vector, regs.group(1) if regs else "?", str(values.get("M", "")), spills,
              compiled.metadata.shared, sep=",")
"""


def _nvidia_backend():
    try:
        from triton.backends import backends

        return "nvidia" in backends
    except ImportError:
        return False


@pytest.mark.skipif(not _triton.available(), reason="Triton does not import")
@pytest.mark.skipif(not _nvidia_backend(), reason="Triton has no NVIDIA backend here")
def test_every_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CONFIGS), json.dumps(LBFGS_CONFIGS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split(",") for line in result.stdout.splitlines() if line.startswith("compiled")]
    names = [row[1] for row in rows]  # compiled, name, ALIGNED, F64, vector, registers, M, spilled bytes, shared bytes
    kernels = ("gradient_dots", "two_loop", "direction_scale", "update", "push", "commit")
    assert {f"{name}_kernel" for name in kernels} <= set(names), result.stdout
    for name in ("gradient_dots", "update", "push"):  # specialised per dtype and flags
        assert names.count(f"{name}_kernel") >= len(CONFIGS) - 1, result.stdout
    lbfgs = ("lbfgs_gradient_dots", "lbfgs_two_loop", "lbfgs_direction", "lbfgs_move")
    assert {f"{name}_kernel" for name in lbfgs} <= set(names), result.stdout
    for name in ("lbfgs_gradient_dots", "lbfgs_direction"):  # per dtype, history and flags
        assert names.count(f"{name}_kernel") >= 2 * len(LBFGS_CONFIGS), result.stdout
    # The aligned float32 specialization of the per-element passes uses vector accesses.
    for name in ("gradient_dots_kernel", "update_kernel"):
        aligned = [row for row in rows if row[1] == name and row[2] == "True" and row[3] == "False"]
        assert aligned and all(row[4] == "True" for row in aligned), result.stdout
    # What only a launch on the GPU would show: shared memory past what one block may
    # have on sm_90 (227 KiB) fails the launch.
    for row in rows:
        assert int(row[8]) <= 227 * 1024, row
    print(result.stdout)  # registers, spills, shared memory per kernel, for the record (pytest -s)
