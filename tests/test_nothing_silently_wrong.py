"""Cases where a user's working code must not become silently wrong, on every backend
that can run here: a model whose memory format changes after stepping, torch's
``maximize`` convention, gradients of another dtype, huge finite gradients, storage
dtypes of the history, checkpoints that are incomplete or corrupt or come from another
machine, errors that must leave nothing half-updated, and errors that name what the
user did. Each compares against an independent truth: an unchanged twin, torch's own
optimizer, or the state before the failed call."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn import Parameter

from cases import BACKENDS, backend_device
from mlbfgs_fused import MLBFGS

FAST = dict(update_period=2, history_size=2, lr=0.01)


def _conv_model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1)).to(device)


def _train(model, opt, steps, x, switch_at=None, memory_format=torch.channels_last):
    for i in range(steps):
        if i == switch_at:
            model.to(memory_format=memory_format)
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()


def _assert_close_state(opt_a, opt_b, params_a, params_b, rtol):
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=rtol * pb.abs().max().item())
        for key in ("momentum_buffer", "param_ema", "grad_ema", "param_snapshot", "grad_snapshot"):
            a, b = opt_a.state[pa][key], opt_b.state[pb][key]
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=key)
        for block_a, block_b in zip(opt_a.block_states(pa), opt_b.block_states(pb)):
            assert torch.equal(block_a["pair_count"], block_b["pair_count"])
            gram_b = block_b["gram"]
            torch.testing.assert_close(block_a["gram"], gram_b, rtol=1e-4, atol=1e-4 * gram_b.abs().max().item())


# -- 1. memory format changed after stepping ------------------------------------------
@pytest.mark.parametrize("blocks", ["group", "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_state_follows_a_memory_format_change_after_stepping(backend, blocks):
    """``model.to(memory_format=torch.channels_last)`` after the optimizer stepped (pairs
    pushed, the ring wrapped): the optimizer goes on exactly as for a twin that stayed
    contiguous (its state follows each parameter by logical index, its history too)."""
    device = backend_device(backend)
    x = torch.randn(2, 3, 6, 6, device=device)
    twin, moved = _conv_model(device), _conv_model(device)
    opt_twin = MLBFGS(twin.parameters(), backend=backend, blocks=blocks, **FAST)
    opt_moved = MLBFGS(moved.parameters(), backend=backend, blocks=blocks, **FAST)
    _train(twin, opt_twin, 9, x)
    _train(moved, opt_moved, 9, x, switch_at=5)
    assert moved[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert opt_moved.state[moved[0].weight]["history_s" if blocks == "tensor" else "momentum_buffer"] is not None
    _assert_close_state(opt_moved, opt_twin, list(moved.parameters()), list(twin.parameters()), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_of_a_channels_last_model_resumes_in_a_contiguous_one(backend):
    """A checkpoint's history is read in the memory order its per-element state was
    saved in, so it resumes in a model of another memory format."""
    device = backend_device(backend)
    x = torch.randn(2, 3, 6, 6, device=device)
    source = _conv_model(device).to(memory_format=torch.channels_last)
    opt_source = MLBFGS(source.parameters(), backend=backend, **FAST)
    _train(source, opt_source, 7, x)
    buffer = io.BytesIO()
    torch.save({"model": source.state_dict(), "opt": opt_source.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    target = _conv_model(device, seed=1)  # contiguous
    target.load_state_dict(saved["model"])
    assert target[0].weight.is_contiguous()
    opt_target = MLBFGS(target.parameters(), backend=backend, **FAST)
    opt_target.load_state_dict(saved["opt"])
    _train(source, opt_source, 4, x)
    _train(target, opt_target, 4, x)
    _assert_close_state(opt_target, opt_source, list(target.parameters()), list(source.parameters()), rtol=1e-5)


def test_a_parameter_split_over_blocks_that_changes_memory_format_raises_and_changes_nothing():
    model = _conv_model("cpu")
    x = torch.randn(2, 3, 6, 6)
    opt = MLBFGS(model.parameters(), backend="foreach", blocks=50, **FAST)
    _train(model, opt, 5, x)
    before = copy.deepcopy(opt.state_dict())
    model.to(memory_format=torch.channels_last)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="spans several blocks changed memory format"):
        opt.step()
    _assert_state_dicts_equal(opt.state_dict(), before)


# -- 2. maximize with weight decay: torch's order ------------------------------------------
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_up_steps_are_torch_sgd_with_momentum_weight_decay_and_maximize(backend, maximize):
    """Before its first curvature pair the paper's step is heavy-ball SGD: the same
    iterates as ``torch.optim.SGD(momentum, weight_decay, maximize)``, whose order
    (negate, then add ``weight_decay * p``) makes weight decay pull toward zero when
    maximising too."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen)]
    ours = [Parameter(t.clone().to(device)) for t in init]
    theirs = [Parameter(t.clone().to(device)) for t in init]
    settings = dict(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=maximize)
    opt = MLBFGS(ours, backend=backend, update_period=50, normalize=True, **settings)
    sgd = torch.optim.SGD(theirs, **settings)
    for step in range(8):
        grads = [torch.randn(t.shape, generator=gen).to(device) for t in init]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        sgd.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def _assert_state_dicts_equal(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid, st in a["state"].items():
        assert st.keys() == b["state"][pid].keys()
        for key, value in st.items():
            assert value.dtype == b["state"][pid][key].dtype and torch.equal(value, b["state"][pid][key]), (pid, key)


# -- 3. a gradient of another dtype or device ----------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_of_another_dtype_raises_and_changes_nothing(backend):
    device = backend_device(backend)
    p = Parameter(torch.randn(40, device=device))
    opt = MLBFGS([p], backend=backend, **FAST)
    for _ in range(3):
        p.grad = torch.randn(40, device=device)
        opt.step()
    before, theta = copy.deepcopy(opt.state_dict()), p.detach().clone()
    p.grad.data = torch.randn(40, dtype=torch.float64, device=device)  # autograd never makes this
    with pytest.raises(RuntimeError, match="assigned grad has data of a different type"):
        opt.step()
    assert torch.equal(p.detach(), theta)
    _assert_state_dicts_equal(opt.state_dict(), before)


# -- 4. huge finite gradients --------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_finite_float32_gradients_step_as_in_float64(backend):
    """Gradients of 1e20 square to 1e40, past float32's range: the finiteness probe and
    the pair's sums take float64 products, so no step is skipped and the float32 run
    follows the float64 one."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(300, generator=gen, dtype=torch.float64)
    grads = [torch.randn(300, generator=gen, dtype=torch.float64) * 1e20 for _ in range(10)]
    results = {}
    for dtype in (torch.float64, torch.float32):
        p = Parameter(init.to(device, dtype, copy=True))
        opt = MLBFGS([p], backend=backend if dtype == torch.float32 else "foreach", **FAST)
        for g in grads:
            p.grad = g.to(device, dtype)
            opt.step()
        block = opt.block_states(p)[0]
        assert block["skipped_steps"].item() == 0 and block["pair_count"].item() == 4
        results[dtype] = p.detach().double().cpu()
    error = (results[torch.float32] - results[torch.float64]).norm() / results[torch.float64].norm()
    assert error < 1e-5


# -- 5. storage dtypes of the history -------------------------------------------------------
def test_history_dtypes_no_backend_stores_are_refused_at_construction():
    p = Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="Invalid history_dtype: torch.float8_e4m3fn"):
        MLBFGS([p], history_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="Invalid history_dtype: torch.float64 for torch.float32 parameters"):
        MLBFGS([p], history_dtype=torch.float64)


_HISTORY_PAIRS = [
    (torch.float64, torch.bfloat16, 2e-2),
    (torch.float64, torch.float16, 5e-3),
    (torch.float64, torch.float32, 1e-5),
    (torch.float32, torch.bfloat16, 2e-2),
]


@pytest.mark.parametrize("param_dtype, history_dtype, tolerance", _HISTORY_PAIRS, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_takes_every_history_dtype_pair(backend, param_dtype, history_dtype, tolerance):
    """Every backend stores the history in each dtype the optimizer accepts (float64
    parameters with a 16-bit history included), close to the float64 run."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(7)
    init = torch.randn(50, generator=gen, dtype=torch.float64)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(9)]
    results = []
    for kwargs in (dict(backend="foreach"), dict(backend=backend, history_dtype=history_dtype)):
        dtype = torch.float64 if kwargs["backend"] == "foreach" and len(kwargs) == 1 else param_dtype
        p = Parameter(init.to(device, dtype, copy=True))
        opt = MLBFGS([p], **FAST, **kwargs)
        for g in grads:
            p.grad = (g + p.detach().double().cpu().to(device)).to(dtype)  # a quadratic pull
            opt.step()
        assert opt.block_states(p)[0]["history_s"].dtype == kwargs.get("history_dtype", dtype)
        results.append(p.detach().double().cpu())
    assert (results[1] - results[0]).norm() / results[0].norm() < tolerance


# -- 7. parameters whose elements share memory ---------------------------------------------
def test_an_expanded_parameter_is_refused_at_construction():
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        MLBFGS([Parameter(torch.randn(3, 1).expand(3, 4))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_parameter_expanded_after_stepping_raises_before_anything_is_written(backend):
    device = backend_device(backend)
    p, q = Parameter(torch.randn(3, 4, device=device)), Parameter(torch.randn(5, device=device))
    opt = MLBFGS([p, q], backend=backend, **FAST)
    for _ in range(3):
        p.grad, q.grad = torch.randn(3, 4, device=device), torch.randn(5, device=device)
        opt.step()
    before, q_before = copy.deepcopy(opt.state_dict()), q.detach().clone()
    p.data = torch.randn(3, 1, device=device).expand(3, 4)
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        opt.step()
    assert torch.equal(q.detach(), q_before)
    _assert_state_dicts_equal(opt.state_dict(), before)


# -- 12. fused=True on meta parameters, as torch's fused optimizers take them ---------------
def test_fused_optimizer_of_meta_parameters_is_built_then_steps_after_to_empty():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    opt = MLBFGS(model.parameters(), fused=True, lr=0.1, update_period=50, normalize=True)
    model.weight.grad = torch.empty_like(model.weight)
    with pytest.raises(RuntimeError, match=r"supported devices: \['cpu', 'cuda'\] but torch.float32 and meta"):
        opt.step()
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # the optimizer's parameters stay the model's
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    torch.nn.init.normal_(model.weight)
    torch.nn.init.normal_(model.bias)
    twin = copy.deepcopy(model)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (twin, sgd)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert opt.state[model.weight]["momentum_buffer"].device.type == "cpu"
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


# -- 8, 15. structural changes after stepping; errors that say what the user did -------------
def test_a_parameter_listed_twice_in_a_group_is_stepped_once_as_its_single_twin():
    """torch warns (and would step it twice); MLBFGS keeps it once, after the warning, so
    the optimizer steps exactly as one built with each parameter once."""
    gen = torch.Generator().manual_seed(2)
    p, q = Parameter(torch.randn(2, generator=gen)), Parameter(torch.randn(3, generator=gen))
    p2, q2 = Parameter(p.detach().clone()), Parameter(q.detach().clone())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = MLBFGS([p, q, p], **FAST)
    twin = MLBFGS([p2, q2], **FAST)
    assert len(opt.param_groups[0]["params"]) == 2
    for _ in range(6):
        grads = [torch.randn(2, generator=gen), torch.randn(3, generator=gen)]
        for (a, b), g in zip(((p, p2), (q, q2)), grads):
            a.grad, b.grad = g + a.detach(), g + b.detach()
        opt.step()
        twin.step()
    assert torch.equal(p, p2) and torch.equal(q, q2)


@pytest.mark.parametrize(
    "change, message",
    [
        (("history_size", 3), "history_size of parameter group 0 changed from 2 to 3"),
        (("blocks", "tensor"), "blocks of parameter group 0 changed from 'group' to 'tensor'"),
        (("history_dtype", torch.bfloat16), "history_dtype of parameter group 0 changed from None to torch.bfloat16"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_structural_change_after_stepping_raises_then_reverting_it_resumes_exactly(backend, change, message):
    """The error names the setting and what to do; nothing changes, so once the setting
    is restored the live run and a checkpoint of it stay the same."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(11)
    params = [Parameter(torch.randn(6, 5, generator=gen).to(device)), Parameter(torch.randn(5, generator=gen).to(device))]
    opt = MLBFGS(params, backend=backend, **FAST)
    grads = [[torch.randn(p.shape, generator=gen).to(device) for p in params] for _ in range(12)]

    def step(i):
        for p, g in zip(params, grads[i]):
            p.grad = g + p.detach()
        opt.step()

    for i in range(5):
        step(i)
    key, value = change
    saved_value = opt.param_groups[0][key]
    opt.param_groups[0][key] = value
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=message):
        step(5)
    opt.param_groups[0][key] = saved_value
    after = opt.state_dict()
    after["param_groups"][0][key] = value  # as saved before the revert
    _assert_state_dicts_equal(after, before)
    checkpoint = copy.deepcopy(opt.state_dict())
    resumed_params = [Parameter(p.detach().clone()) for p in params]
    resumed = MLBFGS(resumed_params, backend=backend, **FAST)
    resumed.load_state_dict(checkpoint)
    for i in range(6, 10):
        step(i)
        for p, g in zip(resumed_params, grads[i]):
            p.grad = g + p.detach()
        resumed.step()
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


# -- 6. incomplete or corrupt checkpoints are refused when they load ------------------------
def _stepped(backend="foreach", steps=7, seed=0, **kwargs):
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(seed)
    params = [Parameter(torch.randn(6, 5, generator=gen).to(device)), Parameter(torch.randn(5, generator=gen).to(device))]
    opt = MLBFGS(params, backend=backend, blocks="tensor", **FAST, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(device) + p.detach()
        opt.step()
    return params, opt


def _corrupt_missing_blocks(sd):
    for key in ("block_step", "pair_count", "skipped_pairs", "skipped_steps", "history_s", "history_y", "gram"):
        del sd["state"][0][key]


def _corrupt_missing_key(sd):
    del sd["state"][1]["grad_ema"]


def _corrupt_nan_momentum(sd):
    sd["state"][0]["momentum_buffer"][0, 0] = float("nan")


def _corrupt_nan_history(sd):
    sd["state"][1]["history_y"][1, 2] = float("inf")


def _corrupt_nan_gram(sd):
    sd["state"][0]["gram"][0, 1, 0, 0] = float("nan")


def _corrupt_history_shape(sd):
    sd["state"][0]["history_s"] = sd["state"][0]["history_s"][:, :-1]


def _corrupt_one_parameter_without_state(sd):
    del sd["state"][1]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_corrupt_missing_blocks, "lacks the curvature history"),
        (_corrupt_missing_key, r"lacks \['grad_ema'\]"),
        (_corrupt_nan_momentum, "'momentum_buffer' of group 0 holds non-finite values"),
        (_corrupt_nan_history, "'history_y' of group 0 holds non-finite values"),
        (_corrupt_nan_gram, "'gram' of group 0 holds non-finite values"),
        (_corrupt_history_shape, "loaded state 'history_s' has shape"),
        (_corrupt_one_parameter_without_state, "no entry for parameter 1 of group 0"),
    ],
    ids=lambda x: getattr(x, "__name__", "")[len("_corrupt_"):] if callable(x) else None,
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_checkpoint_is_refused_when_it_loads_and_changes_nothing(backend, corrupt, message):
    params, opt = _stepped(backend)
    _, twin = _stepped(backend)
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    _assert_state_dicts_equal(opt.state_dict(), before)
    # ... and the optimizer goes on exactly as its twin that never saw the checkpoint
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for _ in range(3):
        for p, q in zip(params, twin_params):
            g = torch.randn(p.shape, generator=torch.Generator().manual_seed(9)).to(p.device)
            p.grad, q.grad = g + p.detach(), g + q.detach()
        opt.step()
        twin.step()
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)


# -- 9. the backend is the process's choice, not the checkpoint's --------------------------
def test_an_explicit_backend_survives_loading_a_checkpoint_of_another():
    _, source = _stepped("cpp")
    params, target = _stepped("foreach", seed=1)
    target.load_state_dict(source.state_dict())
    assert target.param_groups[0]["backend"] == "foreach"
    for p in params:
        p.grad = torch.randn(p.shape)
    target.step()


def test_a_checkpoint_naming_a_backend_unavailable_here_loads_into_a_default_optimizer():
    """A checkpoint saved on a GPU machine names backend='cuda' (or 'triton'); on a
    machine without one a default-built optimizer keeps its default choice and steps."""
    _, source = _stepped("foreach")
    sd = source.state_dict()
    sd["param_groups"][0]["backend"] = "cuda"
    params, target = _stepped("foreach", seed=1)
    target.param_groups[0]["backend"] = None  # as built with the default choice
    target.load_state_dict(sd)
    assert target.param_groups[0]["backend"] is None
    for p in params:
        p.grad = torch.randn(p.shape)
    target.step()
    assert target.block_states(params[0])[0]["step"].item() == 8


def test_a_default_optimizer_takes_the_checkpoints_backend_where_it_runs():
    _, source = _stepped("foreach")
    params, target = _stepped("foreach", seed=1)
    target.param_groups[0]["backend"] = None
    target.load_state_dict(source.state_dict())
    assert target.param_groups[0]["backend"] == "foreach"


# -- 10. torch.compile on every backend -----------------------------------------------------
def _compiled_matches_eager(backend, compiler, fullgraph, equal=torch.equal):
    """The compiled step equals eager: to the bit where the compiled graph runs the same
    operations (aot_eager), within rounding where Inductor fuses them."""
    import warnings

    device = backend_device(backend)

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(device)
        return model, MLBFGS(model.parameters(), backend=backend, **FAST)

    eager_model, eager = make()
    compiled_model, opt = make()
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=compiler, fullgraph=fullgraph)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note that it ignores the profiler's record_function
        for i in range(6):  # pairs form at steps 4 and 6
            grads = [torch.randn_like(p) for p in eager_model.parameters()]
            for p, q, g in zip(eager_model.parameters(), compiled_model.parameters(), grads):
                p.grad, q.grad = g.clone(), g.clone()
            eager.step()
            step()
            for p, q in zip(eager_model.parameters(), compiled_model.parameters()):
                assert equal(p, q), f"step {i}"
    assert int(opt.block_states(compiled_model.weight)[0]["pair_count"]) > 0
    if equal is torch.equal:  # the same state to the bit, not only the same parameters
        _assert_state_dicts_equal(opt.state_dict(), eager.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager_on_every_backend(backend):
    _compiled_matches_eager(backend, "aot_eager", fullgraph=False)


@pytest.mark.parametrize("backend", ["foreach", "cpp"])
def test_compiled_step_is_one_graph_on_the_cpu_backends(backend):
    """``fullgraph=True``: nothing in a step breaks the graph (the Triton backend's host-side
    binding is a deliberate break, docs/design.md "The fused backend")."""
    _compiled_matches_eager(backend, "aot_eager", fullgraph=True)


def test_inductor_compiled_step_matches_eager_on_the_cpu_default_backend():
    _compiled_matches_eager("cpp", "inductor", fullgraph=False,
                            equal=lambda p, q: torch.allclose(p, q, rtol=1e-6, atol=1e-7))


# -- 13. parameters that are not dense, as torch's fused optimizers take them ----------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameters_that_are_not_dense_step_as_their_dense_twins(backend):
    """``torch.randn(10, 5, 2)[..., 0]`` (PyTorch's test_forloop_goes_right_direction uses
    such parameters): stepped through a contiguous copy, equal to a contiguous twin."""
    device = backend_device(backend)
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(10, 5, 2, generator=gen).to(device)
    strided = Parameter(base[..., 0])
    dense = Parameter(base[..., 0].contiguous())
    assert not strided.is_contiguous()
    runs = []
    for p in (strided, dense):
        opt = MLBFGS([p], backend=backend, weight_decay=0.01, **FAST)
        for i in range(7):
            g = torch.randn(10, 5, generator=torch.Generator().manual_seed(i)).to(device)
            p.grad = (g + p.detach())[..., None].expand(10, 5, 2)[..., 0] if p is strided else g + p.detach()
            opt.step()
        runs.append(p.detach().clone())
    assert torch.equal(runs[0], runs[1])


# -- 14. bfloat16 on Triton: the kernel is the float32 step, rounded as the device rounds ----
def test_triton_bfloat16_step_is_the_float32_step_stored_with_the_devices_rounding():
    """A bfloat16 step on the Triton backend stores exactly the float32 step's values:
    rounded to nearest on a GPU, truncated by Triton's interpreter (its float32 to
    bfloat16 cast truncates), which is why it can differ from foreach by one bfloat16 ulp
    there and by nothing else."""
    from mlbfgs_fused.backends import triton as _triton

    if not _triton.available():
        pytest.skip("Triton does not import")
    device = backend_device("triton")

    def stored(x: torch.Tensor) -> torch.Tensor:
        if not _triton.interpreting():
            return x.bfloat16()
        return (x.float().cpu().view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16().to(x.device)

    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        w, g = torch.randn(10, 5, generator=gen).bfloat16(), torch.randn(10, 5, generator=gen).bfloat16()
        ours = Parameter(w.clone().to(device))
        ours.grad = g.clone().to(device)
        opt = MLBFGS([ours], backend="triton", lr=1e-3, weight_decay=0.01)
        opt.step()
        wide = Parameter(w.float().to(device))
        wide.grad = g.float().to(device)
        reference = MLBFGS([wide], backend="foreach", lr=1e-3, weight_decay=0.01)
        reference.step()
        assert torch.equal(ours.detach(), stored(wide.detach()))
        assert torch.equal(opt.state[ours]["momentum_buffer"], stored(reference.state[wide]["momentum_buffer"]))


# -- PyTorch's generic tests: a tensor lr of any 1-element shape, fused=True with a meta parameter
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_two_dimensional_one_element_lr_is_the_float_lr(backend):
    """torch's test_tensor_lr (num_dim=2) passes ``lr=torch.tensor([[1e-3]])``."""
    device = backend_device(backend)
    runs = []
    for lr in (1e-2, torch.tensor([[1e-2]], device=device)):
        gen = torch.Generator().manual_seed(6)
        w = Parameter(torch.randn(10, 5, generator=gen).to(device))
        b = Parameter(torch.randn(10, generator=gen).to(device))
        opt = MLBFGS([w, b], lr=lr, backend=backend, **{k: v for k, v in FAST.items() if k != "lr"})
        for _ in range(5):
            w.grad = torch.randn(10, 5, generator=gen).to(device) + w.detach()
            b.grad = torch.randn(10, generator=gen).to(device) + b.detach()
            opt.step()
        runs.append((w.detach().clone(), b.detach().clone()))
    for x, y in zip(*runs):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_fused_checks_only_the_parameters_it_steps():
    """As torch's fused optimizers: a parameter without a gradient is not stepped and not
    checked (here the meta parameter an optimizer still holds after ``model.to_empty``)."""
    p_cpu = Parameter(torch.randn(3))
    p_meta = Parameter(torch.empty(3, device="meta"))
    twin = Parameter(p_cpu.detach().clone())
    opt = MLBFGS([p_cpu, p_meta], lr=0.1, fused=True, normalize=True)
    sgd = torch.optim.SGD([twin], lr=0.1, momentum=0.9)
    p_cpu.grad = torch.randn(3)
    twin.grad = p_cpu.grad.clone()
    opt.step()
    sgd.step()
    assert torch.equal(p_cpu, twin)
    assert not opt.state.get(p_meta)
    p_meta.grad = torch.empty(3, device="meta")  # now it would be stepped: torch's error
    with pytest.raises(RuntimeError, match=r"supported devices: \['cpu', 'cuda'\] but torch.float32 and meta"):
        opt.step()


def test_fused_optimizer_whose_parameters_were_replaced_by_to_empty_steps_nothing():
    """PyTorch's test_fused_error_on_params_on_meta: ``model.to_empty`` gives the model new
    parameters, so the optimizer's (meta, gradients set to None) have nothing to step."""
    with torch.device("meta"):
        model = torch.nn.Linear(2, 3)
    opt = MLBFGS(model.parameters(), fused=True)
    with torch.device("meta"):
        for p in model.parameters():
            p.grad = torch.rand_like(p)
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating point Tensors"):
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()  # the optimizer's own parameters have no gradient: nothing happens
    assert not any(opt.state.values())
