"""Every registered backend against the float64 reference (docs/design.md, "Testing").

Each test runs on every backend of tests/cases.py (``BACKENDS``: a new backend gets the
whole module by being registered; one that cannot run here is skipped, saying why) on
random problems of tests/problems.py (fresh random inputs, never zeros), closed-loop:
each run computes its gradients from its own parameters. The reference is
mlbfgs_fused/reference/mlbfgs.py in float64, run once per scenario.

What every run is checked for: the relative error of the parameters against the
reference (tests/cases.py, ``PRECISIONS``: float32 below 1e-4, float64 below 1e-10, the
narrow histories and 16-bit parameters as calibrated there), the counters of every block
equal to the reference's, and that the scenario exercised what it claims (the ring
wrapped, damping active, a skipped pair, skipped steps).

Where a backend's kernels run through an interpreter (Triton without a GPU, about a
second a step), a smaller set of the cases runs (``interpreter_runs``: each feature
once); all of them run where its kernels are compiled. A setting a backend does not
take (tests/cases.py, ``LIMITS``) skips its cases, and the backend's error for it is
checked instead.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from cases import (
    BACKENDS,
    FULL,
    LIMITS,
    NARROW,
    backend_device,
    backend_pair_params,
    interpreter_runs,
    limit_params,
    precision_params,
    require,
    rounds_as_the_device,
    tolerance,
)
from mlbfgs_fused import MLBFGS, backends
from problems import (
    ReferenceRun,
    Scenario,
    assert_bit_identical,
    build_params,
    flat,
    make_optimizer,
    reference_run,
    relative_error,
    resume_from_checkpoint,
    run_against_reference,
    run_optimizer,
    set_grads,
    standard_scenario,
)

f64, f32, bf16 = torch.float64, torch.float32, torch.bfloat16
VARIANTS = ["paper", "released"]
# "lists": blocks=[[0, 2], [1]] in group 0 (a block of two tensors that are not neighbours)
BLOCK_MODES = ["group", "tensor", 13, "lists"]
STEPS = 16  # update_period 2: with the three skipped steps, pairs at t = 4, 6, ..., 12
NAN_STEPS = (3, 8, 9)  # a gradient entry of every group is NaN: these steps are skipped


def scenario(blocks="tensor", steps=STEPS, seed=0, **overrides) -> Scenario:
    """tests/problems.py's two groups of odd shapes (per-group lr, weight decay and
    momentum, history of three pairs, a parameter without gradient through step 9), with
    update period 2 and ``blocks`` in both groups (``"lists"``: ``[[0, 2], [1]]`` in group
    0, a block per tensor in group 1)."""
    sc = standard_scenario(blocks, steps=steps, seed=seed, **{"update_period": 2, **overrides})
    if blocks == "lists":
        sc.hyper[0]["blocks"], sc.hyper[1]["blocks"] = [[0, 2], [1]], [[0], [1]]
    return sc


def first_group(sc: Scenario) -> Scenario:
    """``sc`` with its first group only (a smaller case where a second group adds nothing)."""
    return Scenario(shapes=sc.shapes[:1], hyper=sc.hyper[:1], steps=sc.steps, seed=sc.seed,
                    absent={k: v for k, v in sc.absent.items() if k[0] == 0}, noise=sc.noise)


def _seed(*key) -> int:
    """A fixed seed per case, different across cases."""
    return sum(ord(c) * (i + 1) for i, c in enumerate(repr(key))) % 1000


def block_counters(opt: MLBFGS, groups) -> list[dict]:
    """Every block's counters, group by group, in block order."""
    return [
        {k: int(b[k]) for k in ("step", "pair_count", "skipped_pairs", "skipped_steps")}
        for params in groups
        for p in params
        for b in opt.block_states(p)
    ]


def reference_counters(ref: ReferenceRun) -> list[dict]:
    return [
        {"step": g.t, "pair_count": g.t // g.h["update_period"] - 1 - b.skipped_pairs,
         "skipped_pairs": b.skipped_pairs, "skipped_steps": g.skipped_steps}
        for g in ref.groups
        for b in g.blocks
    ]


def assert_exercised(ref: ReferenceRun, blocks=None) -> None:
    """The scenario did what it is there for: some ring wrapped (more pairs pushed than
    it holds), some pair was damped, and with a block per tensor the block of the
    parameter without gradient skipped its first pair."""
    counts = reference_counters(ref)
    held = [len(b.pairs) for g in ref.groups for b in g.blocks]
    assert max(held) == ref.groups[0].h["history_size"], held
    assert max(c["pair_count"] for c in counts) > ref.groups[0].h["history_size"], counts
    assert sum(b.damped_pairs for g in ref.groups for b in g.blocks) > 0
    if blocks == "tensor":
        assert sum(c["skipped_pairs"] for c in counts) >= 1, counts


def reference_state(ref: ReferenceRun, gi: int) -> dict[str, torch.Tensor]:
    """The reference's per-element state of group ``gi``, in the parameters' natural order."""
    g = ref.groups[gi]

    def natural(v):
        out = torch.empty_like(v)
        out[ref.perms[gi]] = v
        return out

    return {
        "momentum_buffer": natural(g.buf),
        "param_ema": natural(g.param_ema),
        "grad_ema": natural(g.grad_ema),
        "param_snapshot": natural(torch.cat([b.param_snapshot for b in g.blocks])),
        "grad_snapshot": natural(torch.cat([b.grad_snapshot for b in g.blocks])),
    }


def assert_state_close(opt: MLBFGS, groups, ref: ReferenceRun, rtol: float) -> None:
    for gi, params in enumerate(groups):
        for key, expected in reference_state(ref, gi).items():
            ours = torch.cat([opt.state[p][key].detach().reshape(-1).double().cpu() for p in params])
            assert relative_error(ours, expected) < rtol, (gi, key, relative_error(ours, expected))


# -- the trajectory: every block layout, both variants, float64 and float32 ---------------
@pytest.mark.parametrize("blocks", BLOCK_MODES, ids=str)
@pytest.mark.parametrize("precision", precision_params(FULL))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, variant, precision, blocks):
    """Two groups, wrapped rings, damping, a skipped pair, a parameter without gradient
    for the first 9 steps, and three non-finite steps that shift the pair schedule:
    parameters within the precision's tolerance, every block's counters exact, and in
    float64 every per-element state vector (momentum, averages, snapshots) too."""
    require(backend, variant=variant)
    interpreter_runs(backend, (variant, precision.param) == ("paper", f32)
                     or (variant == "released" and precision.param == f32 and blocks in ("tensor", 13))
                     or (variant, precision.param, blocks) == ("paper", f64, "tensor"))
    sc = scenario(blocks, variant=variant, seed=_seed(variant, blocks))
    sc.nan_steps = NAN_STEPS
    opt, groups, ref, errors = run_against_reference(
        sc, precision.param, backend_device(backend), backend=backend
    )
    assert max(errors) < tolerance(precision, backend, variant), errors
    assert block_counters(opt, groups) == reference_counters(ref)
    assert ref.groups[0].skipped_steps == len(NAN_STEPS)
    assert_exercised(ref, blocks)
    if precision.param == f64:
        assert_state_close(opt, groups, ref, rtol=1e-9)


def test_the_variants_differ():
    """The released cases above check something the paper's do not: the two references
    part (so a backend that ignored ``variant`` would fail one of them)."""
    thetas = []
    for variant in VARIANTS:
        sc = scenario("tensor", variant=variant, seed=_seed(variant, "tensor"))
        sc.nan_steps = NAN_STEPS
        thetas.append(torch.cat([reference_run(sc).natural(gi) for gi in range(2)]))
    assert relative_error(thetas[1], thetas[0]) > 1e-3


# -- narrow histories and 16-bit parameters -----------------------------------------------
def _precision_scenario(precision, variant) -> Scenario:
    # Update period 4 (five pairs by step 24): pairs of averages over fewer steps are
    # differences of closer numbers, which a narrow history rounds more. 16-bit parameters
    # with the paper's normalisation: the warm-up is SGD, and its first steps move each
    # element by more than its 8 or 11 bits round away.
    return scenario(13, steps=24, seed=7, update_period=4, variant=variant,
                    **({"normalize": True} if precision.half else {}))


@functools.cache
def _foreach_errors(precision, variant) -> float:
    sc = _precision_scenario(precision, variant)
    return max(run_against_reference(sc, precision.param, backend="foreach",
                                     history_dtype=precision.history_dtype)[3])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", precision_params(NARROW))
@pytest.mark.parametrize("backend", BACKENDS)
def test_precision_matches_reference(backend, precision, variant):
    """A history narrower than the parameters (bfloat16 or float16 under float32,
    float32 under float64) and 16-bit parameters: the parameters close to the float64
    reference, every state vector in the dtype it is kept in, the rings wrapped; a
    fused backend, whose arithmetic is float32, at least about as close as foreach."""
    require(backend, variant=variant)
    interpreter_runs(backend, variant == "paper" and precision.id in ("f32-bf16", "f16-f16", "bf16-bf16"))
    sc = _precision_scenario(precision, variant)
    opt, groups, ref, errors = run_against_reference(
        sc, precision.param, backend_device(backend), backend=backend, history_dtype=precision.history_dtype
    )
    assert max(errors) < tolerance(precision, backend, variant), errors
    first = groups[0][0]
    assert first.dtype == precision.param
    for key in ("momentum_buffer", "param_ema", "grad_ema", "param_snapshot", "grad_snapshot"):
        assert opt.state[first][key].dtype == precision.param, key
    block = opt.block_states(first)[0]
    assert block["history_s"].dtype == block["history_y"].dtype == precision.history
    assert block["gram"].dtype == f64
    counters = block_counters(opt, groups)
    assert max(c["pair_count"] for c in counters) > 3  # pairs pushed, the ring of three wrapped
    assert all(c["skipped_steps"] == 0 and c["step"] == sc.steps for c in counters)
    if precision.half and backend != "foreach" and rounds_as_the_device(precision, backend):
        assert max(errors) <= 1.5 * _foreach_errors(precision, variant), errors


# -- maximize, weight decay, normalize ------------------------------------------------------
@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("normalize", ["always", True, False], ids=["always", "paper", "never"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flags_match_reference(backend, normalize, maximize):
    """``normalize`` (every step, once a pair exists, never) and ``maximize`` with weight
    decay (group 0; torch's order: negate, then add ``weight_decay * theta``), float64."""
    interpreter_runs(backend, (normalize, maximize) == (False, True))
    sc = scenario("tensor", seed=_seed(normalize, maximize), normalize=normalize, maximize=maximize)
    sc.hyper[0]["weight_decay"] = 0.1
    opt, groups, ref, errors = run_against_reference(sc, f64, backend_device(backend), backend=backend)
    assert max(errors) < 1e-10, errors
    assert block_counters(opt, groups) == reference_counters(ref)


def test_the_flags_change_the_reference():
    """Each of the six settings above leads the reference elsewhere (so a backend that
    ignored ``normalize`` or ``maximize`` would fail a case)."""
    ends = []
    for normalize in ("always", True, False):
        for maximize in (False, True):
            sc = scenario("tensor", seed=0, normalize=normalize, maximize=maximize)  # one problem for all six
            sc.hyper[0]["weight_decay"] = 0.1
            ends.append(torch.cat([reference_run(sc).natural(gi) for gi in range(2)]))
    for i in range(len(ends)):
        for j in range(i):
            assert relative_error(ends[i], ends[j]) > 1e-3, (i, j)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_published_hyperparameters(backend, variant):
    """The published settings (ema_decay 0.999, pair momentum 0.9, T = 10) in float64,
    through the ring of two wrapping."""
    require(backend, variant=variant)
    interpreter_runs(backend, False)
    sc = scenario("group", steps=50, seed=_seed("published", variant), history_size=2, update_period=10,
                  ema_decay=(0.999, 0.999), pair_momentum=0.9, variant=variant)
    opt, groups, ref, errors = run_against_reference(sc, f64, backend_device(backend), backend=backend)
    assert max(errors) < 1e-10, errors
    assert len(ref.groups[0].blocks[0].pairs) == 2
    assert block_counters(opt, groups) == reference_counters(ref)
    assert max(c["pair_count"] for c in block_counters(opt, groups)) > 2


# -- several groups: one verdict, their own backends and variants ------------------------
def _groups_scenario(nan_group: int) -> Scenario:
    sc = scenario("tensor", seed=9)
    sc.hyper[1].update(backend="foreach", variant="released")
    sc.nan_steps, sc.nan_groups = (3, 12), (nan_group,)  # step 12 would push a pair
    sc.absent = {}  # every gradient present, so the comparison below isolates the skip
    return sc


@functools.cache
def _alone(nan_group: int) -> list[torch.Tensor]:
    """The reference where a non-finite gradient skips only its own group's step."""
    sc = _groups_scenario(nan_group)
    alone = ReferenceRun(sc, [h.get("blocks", "group") for h in sc.hyper])
    for step in range(sc.steps):
        for gi, r in enumerate(alone.groups):
            r.step(sc.grad(gi, alone.natural(gi), step)[alone.perms[gi]])
    return [alone.natural(gi) for gi in range(2)]


def _assert_one_more_skipped_step(before: dict, after: dict) -> None:
    """``after`` is ``before`` with one more skipped step in every block, to the bit."""
    assert before.keys() == after.keys()
    for pid, state in before.items():
        assert state.keys() == after[pid].keys()
        for key, value in state.items():
            assert torch.equal(after[pid][key], value + 1 if key == "skipped_steps" else value), (pid, key)


@pytest.mark.parametrize("nan_group", [0, 1], ids=["nan-in-group0", "nan-in-group1"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_gradient_in_one_group_skips_every_group(backend, nan_group):
    """Group 0 on the backend with the paper's variant, group 1 on foreach with the
    released one: a NaN in one group's gradient (once just before a pair is due) leaves
    every parameter and state tensor of both groups as it was but the skipped-step
    counters; the run then follows the reference, which a run skipping only the NaN's
    group would not."""
    sc = _groups_scenario(nan_group)
    groups = build_params(sc, f64, backend_device(backend))
    opt = make_optimizer(sc, groups, backend=backend)
    assert [backends.select(g).name for g in opt.param_groups] == [backend, "foreach"]
    assert [g["variant"] for g in opt.param_groups] == ["paper", "released"]
    for step in range(sc.steps):
        set_grads(sc, groups, step)
        if step in sc.nan_steps:
            params = [flat(g) for g in groups]
            state = copy.deepcopy(opt.state_dict()["state"])
        opt.step()
        if step in sc.nan_steps:
            assert all(torch.equal(flat(g), p) for g, p in zip(groups, params))
            _assert_one_more_skipped_step(state, opt.state_dict()["state"])
    ref = reference_run(sc)
    errors = [relative_error(flat(params), ref.natural(gi)) for gi, params in enumerate(groups)]
    assert max(errors) < 1e-10, errors
    assert block_counters(opt, groups) == reference_counters(ref)
    assert [g.skipped_steps for g in ref.groups] == [2, 2]
    other = 1 - nan_group  # against a reference that skipped the NaN's group alone, it diverged
    assert relative_error(flat(groups[other]), _alone(nan_group)[other]) > 1e-4


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 in the interpreter
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_group_of_two_dtypes_steps_as_one_group(backend, variant):
    """A float64 parameter among float32 ones: two arenas whose finiteness verdict and
    direction norm are the group's (an infinity in the float64 parameter's gradient
    skips the float32 ones too)."""
    require(backend, variant=variant)
    sc = first_group(scenario("tensor", steps=14, seed=_seed("two dtypes", variant), variant=variant))
    sc.nan_steps, sc.nan_value = (5,), float("inf")  # in parameter 0's gradient
    groups = build_params(sc, f32, backend_device(backend))
    groups[0][0] = torch.nn.Parameter(groups[0][0].detach().double())
    opt = make_optimizer(sc, groups, backend=backend)
    run_optimizer(sc, opt, groups)
    ref = reference_run(sc)
    errors = [relative_error(flat(params), ref.natural(gi)) for gi, params in enumerate(groups)]
    assert max(errors) < 1e-4, errors
    assert block_counters(opt, groups) == reference_counters(ref)
    assert all(c["skipped_steps"] == 1 for c in block_counters(opt, groups))
    wide, narrow = groups[0][0], groups[0][2]
    assert wide.dtype == f64 and opt.block_states(wide)[0]["history_s"].dtype == f64
    assert opt.block_states(narrow)[0]["history_s"].dtype == f32


# -- AMP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_amp_grad_scale_and_found_inf(backend, variant):
    """GradScaler's protocol (``grad_scale``, ``found_inf`` summed over devices): gradients
    still scaled by a power of two step to the bit as the unscaled ones, and
    ``found_inf = 2`` skips the step exactly as a NaN gradient does."""
    require(backend, variant=variant)
    device = backend_device(backend)
    def make():
        return first_group(scenario(13, steps=10, seed=_seed("amp", variant), variant=variant, history_size=2))

    sc = make()
    sc.nan_steps = (5,)
    plain = run_against_reference(sc, f32, device, backend=backend)
    assert max(plain[3]) < 1e-4, plain[3]
    sc = make()  # no NaN: found_inf says it instead
    groups = build_params(sc, f32, device)
    opt = make_optimizer(sc, groups, backend=backend)
    for step in range(sc.steps):
        set_grads(sc, groups, step)
        for p in (p for params in groups for p in params if p.grad is not None):
            p.grad.mul_(1024.0)
        opt.grad_scale = torch.tensor(1024.0, device=device)
        opt.found_inf = torch.tensor(2.0 if step == 5 else 0.0, device=device)
        opt.step()
    assert_bit_identical(plain[:2], (opt, groups))
    counters = block_counters(opt, groups)
    assert all(c["skipped_steps"] == 1 for c in counters) and max(c["pair_count"] for c in counters) > 2


# -- checkpoints ----------------------------------------------------------------------------
# Saved before any pair, just after the first (t = 4), after the ring of three wrapped.
SAVES = [(3, "group", "paper"), (5, 13, "paper"), (11, "tensor", "paper"), (11, "tensor", "released")]


@pytest.mark.parametrize("save_at,blocks,variant", SAVES, ids=[f"{s}-{b}-{v}" for s, b, v in SAVES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_exact(backend, save_at, blocks, variant):
    """A checkpoint (through torch.save, loaded with ``map_location="cpu"``, bfloat16
    history) resumes in a new optimizer over new parameters to the bit."""
    require(backend, variant=variant)
    interpreter_runs(backend, save_at == 5)
    sc = scenario(blocks, seed=_seed("resume", blocks), variant=variant)
    run1, run2 = resume_from_checkpoint(sc, save_at, backend, backend, backend_device(backend),
                                        history_dtype=bf16)
    assert_bit_identical(run1, run2)
    assert max(c["pair_count"] for c in block_counters(*run2)) > 3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("first,second", backend_pair_params())
def test_resume_across_backends(first, second, variant):
    """A checkpoint saved by one backend resumes on another (both ways with foreach, on the
    other backend's device) and goes on as the uninterrupted run and the reference."""
    backend = first if second == "foreach" else second
    require(backend, variant=variant)
    interpreter_runs(backend, variant == "paper")
    sc = scenario("tensor", seed=_seed("across", variant), variant=variant)
    (opt, groups), (opt2, groups2) = resume_from_checkpoint(sc, 7, first, second, backend_device(backend))
    ref = reference_run(sc)
    for gi, (g1, g2) in enumerate(zip(groups, groups2)):
        assert relative_error(flat(g2), flat(g1)) < 1e-4
        assert relative_error(flat(g2), ref.natural(gi)) < 1e-4
    assert block_counters(opt2, groups2) == block_counters(opt, groups) == reference_counters(ref)
    assert [backends.select(g).name for g in opt2.param_groups] == [second, second]


# -- the user's tensors: memory orders, tensor lr --------------------------------------------
def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t``'s values in another memory order: channels_last (4-d), column-major (2-d and
    up), or every other element of a larger buffer (not dense)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t
    return torch.stack([t, t], dim=-1)[..., 0]


def _other_layout(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g`` laid out unlike ``p``."""
    if p.is_contiguous():
        return _relayout(g, "transposed") if g.dim() >= 2 else _relayout(g, "strided")
    return g.contiguous()


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "strided"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_in_other_memory_orders(backend, layout):
    """A dense parameter in another memory order is stepped in place in that order, its
    state laid out like it; a parameter that is not dense steps too; gradients laid out
    unlike their parameters (every other step) are read by logical index."""
    interpreter_runs(backend, layout != "strided")
    device = backend_device(backend)
    sc = Scenario(shapes=[[(4, 3, 5, 2), (6, 5), (5,)]],
                  hyper=[dict(lr=0.05, weight_decay=0.01, history_size=2, update_period=3, ema_decay=(0.9, 0.95),
                              pair_momentum=0.5, blocks="tensor")],
                  steps=12, seed=_seed("layout", layout))
    (params,) = build_params(sc, f32, device)
    params = [torch.nn.Parameter(_relayout(p.detach(), layout)) for p in params]
    strides, pointers = [p.stride() for p in params], [p.data_ptr() for p in params]
    assert any(not p.is_contiguous() for p in params)
    opt = make_optimizer(sc, [params], backend=backend)
    for step in range(sc.steps):
        set_grads(sc, [params], step)
        if step % 2:
            for p in params:
                p.grad = _other_layout(p.grad, p)
        opt.step()
    ref = reference_run(sc)
    assert relative_error(flat(params), ref.natural(0)) < 1e-4
    assert [p.stride() for p in params] == strides and [p.data_ptr() for p in params] == pointers
    if layout != "strided":
        for p in params:
            for key in ("momentum_buffer", "param_ema", "grad_snapshot"):
                assert opt.state[p][key].stride() == p.stride(), key
    assert block_counters(opt, [params]) == reference_counters(ref)
    assert max(c["pair_count"] for c in block_counters(opt, [params])) > 2  # the ring of two wrapped


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_matches_reference(backend):
    """A 1-element tensor ``lr`` per group (on the CPU, as schedulers keep it)."""
    interpreter_runs(backend, False)
    sc = scenario(13, seed=_seed("tensor lr"))
    for h in sc.hyper:
        h["lr"] = torch.tensor(h["lr"])
    opt, groups, ref, errors = run_against_reference(sc, f32, backend_device(backend), backend=backend)
    assert max(errors) < 1e-4, errors
    assert block_counters(opt, groups) == reference_counters(ref)


# -- what a backend does not do -------------------------------------------------------------
@pytest.mark.parametrize("backend,key,value", limit_params())
def test_a_limit_raises_before_anything_is_written(backend, key, value):
    """Each entry of tests/cases.py's LIMITS (what the parity cases skip) is a clear error
    from the backend, raised before any parameter is written."""
    device = backend_device(backend)
    p = torch.nn.Parameter(torch.randn(7, device=device))
    before = p.detach().clone()
    opt = MLBFGS([p], backend=backend, **{key: value})
    p.grad = torch.randn(7, device=device)
    with pytest.raises((NotImplementedError, RuntimeError, ValueError), match=key):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert LIMITS[(backend, key, value)]
