"""MLBFGS held to the generic conventions PyTorch's own optimizer suite holds torch.optim to.

Each test follows one of ``test/test_optim.py``'s generic tests (named in its docstring)
on MLBFGS's foreach backend, and on every registered backend (tests/cases.py; Triton
through the interpreter when there is no GPU) where that is cheap; then the cases of issue 8 that torch's suite does
not cover: momentum schedules, old checkpoints, hooks that see and change block state,
a model converted after stepping, and a compiled first step.
"""

from __future__ import annotations

import copy
import functools
import io
import pickle
import re

import pytest
import torch
from torch.nn import Parameter
from torch.optim import SGD
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    CyclicLR,
    OneCycleLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from cases import BACKENDS, backend_device
from mlbfgs_fused import MLBFGS

# Short update periods so that a few steps form pairs and use them.
FAST = dict(update_period=2, history_size=2)


def _weight_bias(device="cpu", contiguous=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = torch.randn(10, 5, generator=gen)
        bias = torch.randn(10, generator=gen)
    else:
        weight = torch.randn(10, 5, 2, generator=gen)[..., 0]
        bias = torch.randn(10, 2, generator=gen)[..., 0]
    inpt = torch.randn(5, generator=gen)
    return Parameter(weight.to(device)), Parameter(bias.to(device)), inpt.to(device)


def _closure(opt, weight, bias, inpt):
    opt.zero_grad()
    loss = (weight.mv(inpt) + bias).pow(2).sum()
    loss.backward()
    return loss


def _random_grads(params, step: int):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)


def _assert_same_state(opt1, opt2):
    s1, s2 = opt1.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for pid, st in s1["state"].items():
        for key, value in st.items():
            assert value.dtype == s2["state"][pid][key].dtype and torch.equal(value, s2["state"][pid][key]), key


# -- construction errors (test_errors, get_error_inputs_for_all_optims) -------------
def test_construction_errors_in_torch_wording():
    p, q = Parameter(torch.randn(1, 1)), Parameter(torch.randn(1, 1))
    with pytest.raises(TypeError, match="params argument given to the optimizer should be an iterable"):
        MLBFGS(p)
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        MLBFGS([])
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        MLBFGS([{"params": p}, {"params": p}])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        MLBFGS([p], lr=torch.tensor([0.001, 0.001]))
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        MLBFGS([p * 2])
    with pytest.raises(TypeError, match="optimizer can only optimize Tensors"):
        MLBFGS([p, 1.0])
    with pytest.raises(TypeError, match="ordered collections"):
        MLBFGS([{"params": {p, q}}])
    with pytest.raises(ValueError, match="all optimizer params should be with/without names. Some param names are missing"):
        MLBFGS([("weight", p), q])
    with pytest.raises(
        ValueError,
        match="all optimizer param groups should be with/without names. cannot add param group with names to the optimizer",
    ):
        MLBFGS([{"params": [p], "lr": 1e-2}, {"params": [("weight", q)]}])
    with pytest.raises(TypeError, match="param_group must be a dict"):
        MLBFGS([p]).add_param_group([q])


def test_duplicate_parameters_warn_as_torch_does():
    p = Parameter(torch.randn(1, 1))
    with pytest.warns(UserWarning, match="a parameter group with duplicate parameters"):
        MLBFGS([p, p])


def test_a_rejected_group_leaves_no_trace():
    p, q = Parameter(torch.randn(3)), Parameter(torch.randn(2))
    opt = MLBFGS([p])
    group = {"params": [q], "lr": "0.1"}
    with pytest.raises(TypeError, match="Invalid learning rate"):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1 and group == {"params": [q], "lr": "0.1"}
    opt.add_param_group({"params": [q]})  # q was not left registered
    assert len(opt.param_groups) == 2


# -- the step goes the right way (test_forloop_goes_right_direction and friends) ------
SCHEDULERS = {
    "none": lambda opt: [],
    "step": lambda opt: [StepLR(opt, gamma=0.9, step_size=10)],
    "plateau": lambda opt: [ReduceLROnPlateau(opt)],
    "cosine": lambda opt: [CosineAnnealingLR(opt, T_max=20)],
    "onecycle": lambda opt: [
        OneCycleLR(opt, max_lr=0.05, total_steps=20, base_momentum=0.4, max_momentum=0.5)
    ],
    "cyclic": lambda opt: [
        CyclicLR(opt, base_lr=0.01, max_lr=0.05, step_size_up=5, base_momentum=0.4, max_momentum=0.5)
    ],
}
# Heavy-ball momentum 0.9 on top of the raw warm-up steps overshoots on this small
# deterministic problem (the float64 reference does the same); 0.5 goes down steadily.
DIRECTION = dict(FAST, lr=0.05, momentum=0.5)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_goes_right_direction(scheduler, contiguous, maximize):
    weight, bias, inpt = _weight_bias(contiguous=contiguous)
    opt = MLBFGS([weight, bias], maximize=maximize, backend="foreach", **DIRECTION)
    schedulers = SCHEDULERS[scheduler](opt)
    closure = functools.partial(_closure, opt, weight, bias, inpt)
    initial = closure().item()
    for _ in range(20):
        loss = opt.step(closure)
        for s in schedulers:
            s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
    final = closure().item()
    assert final > initial if maximize else final < initial


@pytest.mark.parametrize("backend", BACKENDS)
def test_goes_right_direction_on_each_backend(backend):
    weight, bias, inpt = _weight_bias(backend_device(backend))
    opt = MLBFGS([weight, bias], backend=backend, **DIRECTION)
    closure = functools.partial(_closure, opt, weight, bias, inpt)
    initial = closure().item()
    for _ in range(12):
        opt.step(closure)
    assert closure().item() < initial


def test_param_group_with_lrscheduler_goes_right_direction():
    for make in SCHEDULERS.values():
        weight, bias, inpt = _weight_bias()
        opt = MLBFGS([{"params": [weight]}, {"params": [bias], "lr": 0.01}], backend="foreach", **DIRECTION)
        schedulers = make(opt)
        closure = functools.partial(_closure, opt, weight, bias, inpt)
        initial = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            for s in schedulers:
                s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert closure().item() < initial


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr_matches_float_lr(backend):
    """test_tensor_lr: a 1-element Tensor lr steps exactly as the same float."""
    dev = backend_device(backend)
    runs = []
    for lr in (0.05, torch.tensor(0.05)):
        weight, bias, inpt = _weight_bias(dev)
        opt = MLBFGS([weight, bias], lr=lr, backend=backend, **FAST)
        for _ in range(5):
            opt.step(functools.partial(_closure, opt, weight, bias, inpt))
        runs.append((weight, bias))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_scheduler_drives_float_and_tensor_lr(backend):
    """A scheduler changes a float lr and a tensor lr alike, and the step reads the new
    value: in the warm-up without normalisation or momentum, theta -= lr * g exactly."""
    dev = backend_device(backend)
    for lr in (0.1, torch.tensor(0.1), torch.tensor(0.1, device=dev)):
        p = Parameter(torch.randn(4, device=dev))
        opt = MLBFGS([p], lr=lr, momentum=0.0, normalize=False, update_period=1000, backend=backend)
        sched = StepLR(opt, step_size=1, gamma=0.5)
        for expected in (0.1, 0.05, 0.025):
            grad = torch.randn(4, device=dev)
            p.grad = grad.clone()
            before = p.detach().clone()
            opt.step()
            sched.step()
            torch.testing.assert_close(p.detach(), before - expected * grad)


def test_param_groups_weight_decay():
    weight, bias, inpt = _weight_bias()
    opt = MLBFGS(
        [dict(params=[weight], weight_decay=0.1), dict(params=[bias], weight_decay=0.0)],
        backend="foreach",
        **DIRECTION,
    )
    closure = functools.partial(_closure, opt, weight, bias, inpt)
    initial = closure().item()
    for _ in range(20):
        opt.step(closure)
    assert closure().item() < initial


def test_param_groups_lr():
    """A group's own lr wins over the constructor's; a group at lr ~ 0 does not move."""
    weight, bias, inpt = _weight_bias()
    irrelevant = Parameter(torch.randn(2))
    before = irrelevant.detach().clone()
    opt = MLBFGS(
        [dict(params=[weight, bias], lr=0.05), dict(params=[irrelevant])], lr=1e-28, momentum=0.5, **FAST
    )
    closure = functools.partial(_closure, opt, weight, bias, inpt)
    initial = closure().item()
    for step in range(20):
        loss = closure()
        irrelevant.grad = torch.rand_like(irrelevant)
        opt.step()
    assert loss.item() < initial
    assert torch.equal(irrelevant, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_noop_when_params_have_no_grad(backend):
    params = [torch.randn(2, 3, device=backend_device(backend)) for _ in range(2)]
    before = [p.clone() for p in params]
    opt = MLBFGS(params, backend=backend)
    assert opt.step(lambda: torch.tensor([1.0])).item() == 1.0
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_noop_for_zero_grads(backend):
    param = torch.randn(5, 1, device=backend_device(backend), requires_grad=True)
    before = param.detach().clone()
    opt = MLBFGS([param], backend=backend)
    param.grad = torch.zeros_like(param)
    opt.step(lambda: torch.tensor([1.0]))
    assert torch.equal(param.detach(), before)


def test_optimizer_can_be_printed():
    opt = MLBFGS([Parameter(torch.randn(2, 3))], ema_decay=(0.9, 0.99))
    text = repr(opt)
    assert text.startswith("MLBFGS (") and "ema_decay: (0.9, 0.99)" in text and "momentum: 0.9" in text


def test_non_empty_state():
    model = torch.nn.Linear(5, 5)
    opt = MLBFGS(model.parameters())
    model(torch.rand(2, 5)).sum().backward()
    opt.step()
    assert len(opt.state) == 2 and all(len(s) > 0 for s in opt.state.values())


# -- zero_grad -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_follows_torch(backend, set_to_none):
    """A step leaves the gradients as they were (the same tensors, the same values);
    zero_grad then sets them to None or zeroes them in place, as torch.optim does."""
    model = torch.nn.Linear(4, 3).to(backend_device(backend))
    opt = MLBFGS(model.parameters(), backend=backend)
    for _ in range(2):  # the second zero_grad runs after the backend bound its buffers
        model(torch.randn(2, 4, device=backend_device(backend))).sum().backward()
        grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
        opt.step()
        assert all(p.grad is g and torch.equal(g, value) for p, (g, value) in zip(model.parameters(), grads))
        opt.zero_grad(set_to_none=set_to_none)
        for p in model.parameters():
            if set_to_none:
                assert p.grad is None
            else:
                assert p.grad is not None and not p.grad.any() and not p.grad.requires_grad


# -- state_dict ------------------------------------------------------------------------
def _named(params, named):
    return [(f"name{i}", p) for i, p in enumerate(params)] if named else params


def _without_param_names(state_dict):
    state_dict = copy.deepcopy(state_dict)
    for group in state_dict["param_groups"]:
        group.pop("param_names", None)
    return state_dict


@pytest.mark.parametrize("named0", [True, False])
@pytest.mark.parametrize("named1", [True, False])
def test_state_dict_deterministic(named0, named1):
    """test_state_dict_deterministic: a loaded copy steps bit-identically and saves an
    equal state_dict, whether either optimizer was built from named parameters."""
    weight, bias, inpt = _weight_bias()
    opt = MLBFGS(_named([weight, bias], named0), backend="foreach", **FAST)
    for _ in range(7):
        opt.step(functools.partial(_closure, opt, weight, bias, inpt))
    with torch.no_grad():
        weight_c, bias_c = Parameter(weight.clone()), Parameter(bias.clone())
    opt_c = MLBFGS(_named([weight_c, bias_c], named1), backend="foreach", **FAST)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(7):
        opt.step(functools.partial(_closure, opt, weight, bias, inpt))
        opt_c.step(functools.partial(_closure, opt_c, weight_c, bias_c, inpt))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    a, b = _without_param_names(opt.state_dict()), _without_param_names(opt_c.state_dict())
    assert a["param_groups"] == b["param_groups"]
    torch.testing.assert_close(a["state"], b["state"], rtol=0, atol=0)
    # Repeated parameters have identical representations (pytorch#36831).
    opt_c.param_groups.extend(opt_c.param_groups)
    assert (
        _without_param_names(opt.state_dict())["param_groups"][-1]
        == _without_param_names(opt_c.state_dict())["param_groups"][-1]
    )


def test_save_load_equality_with_weights_only():
    weight, bias, inpt = _weight_bias()
    opt = MLBFGS(_named([weight, bias], True), history_dtype=torch.bfloat16, **FAST)
    for _ in range(3):
        opt.step(functools.partial(_closure, opt, weight, bias, inpt))
    sd = opt.state_dict()
    for weights_only in (False, True):
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=weights_only)
        assert loaded["param_groups"] == sd["param_groups"]
        torch.testing.assert_close(loaded["state"], sd["state"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_and_pickle_continue_bit_identically(backend):
    """test_deepcopy_copies_all_public_attrs, and more: the copy owns its state and
    steps exactly as the original."""
    dev = backend_device(backend)
    params = [Parameter(torch.randn(2, 3, device=dev)) for _ in range(2)]
    opt = MLBFGS(params, backend=backend, **FAST)
    for step in range(4):
        _random_grads(params, step)
        opt.step()
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    copied = copy.deepcopy(opt)
    assert {k for k in copied.__dict__ if not k.startswith("_")} == public
    pickled = pickle.loads(pickle.dumps(opt))
    for other in (copied, pickled):
        other_params = [p for g in other.param_groups for p in g["params"]]
        assert all(a is not b and torch.equal(a, b) for a, b in zip(params, other_params))
    for step in range(4, 6):  # a pair is formed at step 4 (counting from 0: the fifth)
        for o in (opt, copied, pickled):
            _random_grads([p for g in o.param_groups for p in g["params"]], step)
            o.step()
    for other in (copied, pickled):
        other_params = [p for g in other.param_groups for p in g["params"]]
        assert all(torch.equal(a, b) for a, b in zip(params, other_params))
        _assert_same_state(opt, other)


def test_load_nontensor_step():
    """test_load_nontensor_step: counters saved as Python numbers still load."""
    params = [Parameter(torch.randn(2, 3)) for _ in range(2)]
    opt = MLBFGS(params, **FAST)
    for step in range(3):
        _random_grads(params, step)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    for st in sd["state"].values():
        if "block_step" in st:
            st["block_step"] = st["block_step"].tolist()  # plain Python numbers, as older checkpoints held
    opt.load_state_dict(sd)
    opt.step()
    assert opt.block_states(params[0])[0]["step"].dtype == torch.int64
    assert int(opt.block_states(params[0])[0]["step"]) == 4


# -- hooks -------------------------------------------------------------------------------
def _state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def _state_dict_post_hook(optimizer, state_dict):
    if "test" in state_dict["state"]:
        state_dict["state"].pop("test")
        state_dict["ran_state_dict_pre_hook"] = True
    else:
        state_dict["ran_state_dict_pre_hook"] = False
    return state_dict


def _load_state_dict_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def _load_state_dict_pre_hook2(optimizer, state_dict):
    my_state_dict = copy.deepcopy(state_dict)
    my_state_dict["param_groups"][0]["lr"] = 0.003
    return my_state_dict


def _load_state_dict_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


def _stepped_optimizer(steps=3, **kwargs):
    param = Parameter(torch.rand(2, 3))
    opt = MLBFGS([param], **{**FAST, **kwargs})
    for step in range(steps):
        _random_grads([param], step)
        opt.step()
    return param, opt


def test_state_dict_hooks():
    """test_state_dict_pre_hook / _post_hook / _pre_post_hook."""
    _, opt = _stepped_optimizer()
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    assert opt.state_dict()["state"]["test"] == 1
    _, opt = _stepped_optimizer()
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    assert opt.state_dict()["ran_state_dict_pre_hook"] is False
    opt.register_state_dict_pre_hook(_state_dict_pre_hook)
    sd = opt.state_dict()
    assert "test" not in sd["state"] and sd["ran_state_dict_pre_hook"] is True


def test_load_state_dict_pre_hook_and_prepend():
    _, opt = _stepped_optimizer()
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2, prepend=True)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.002  # hook1 runs last and wins


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_post_hook_and_non_parameter_state(backend):
    """test_load_state_dict_post_hook / _pre_post_hook. The post-hook leaves bools in
    ``optimizer.state``: saving, loading and stepping go on around them (this raised
    ``TypeError: argument of type 'bool' is not iterable``)."""
    param = Parameter(torch.rand(2, 3, device=backend_device(backend)))
    opt = MLBFGS([param], backend=backend, **FAST)
    opt.register_load_state_dict_post_hook(_load_state_dict_post_hook)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["ran_load_state_dict_pre_hook2"] is False
    assert opt.state["ran_load_state_dict_post_hook"] is True
    opt.register_load_state_dict_pre_hook(_load_state_dict_pre_hook2)
    for step in range(3):
        _random_grads([param], step)
        opt.step()
    opt.load_state_dict(opt.state_dict())  # the bools are in the saved state now
    assert opt.state["ran_load_state_dict_pre_hook2"] is True
    _random_grads([param], 3)
    opt.step()
    assert int(opt.block_states(param)[0]["step"]) == 4


def test_load_state_dict_pre_hook_that_returns_a_new_state_dict_is_honoured_for_block_state():
    """A pre-hook's state dict is the one loaded, block state included (the original
    blocks used to load anyway)."""
    param, opt = _stepped_optimizer(steps=5)
    sd = copy.deepcopy(opt.state_dict())
    assert int(sd["state"][0]["pair_count"]) > 0

    def reset_history(optimizer, state_dict):
        state_dict = copy.deepcopy(state_dict)
        first = state_dict["state"][0]
        for key in ("history_s", "history_y", "gram", "pair_count", "skipped_pairs", "skipped_steps"):
            first[key].zero_()
        first["block_step"].fill_(41)
        return state_dict

    opt.register_load_state_dict_pre_hook(reset_history)
    opt.load_state_dict(sd)
    (loaded,) = opt.block_states(param)
    assert int(loaded["step"]) == 41 and int(loaded["pair_count"]) == 0
    assert not loaded["gram"].any() and not loaded["history_s"].any()
    assert int(sd["state"][0]["block_step"]) == 5  # the caller's dict is untouched
    _random_grads([param], 5)
    opt.step()  # and the arena was built from what the hook returned
    assert int(opt.block_states(param)[0]["step"]) == 42


def test_load_state_dict_post_hook_sees_block_state_in_its_own_dtypes():
    param, opt = _stepped_optimizer(steps=5, history_dtype=torch.bfloat16)
    seen = {}

    def post_hook(optimizer):
        seen.update({key: value.dtype for key, value in optimizer.state[param].items() if key != "param_ema"})

    opt.register_load_state_dict_post_hook(post_hook)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert seen == {
        "block_step": torch.int64,
        "pair_count": torch.int64,
        "skipped_pairs": torch.int64,
        "skipped_steps": torch.int64,
        "history_s": torch.bfloat16,
        "history_y": torch.bfloat16,
        "gram": torch.float64,
        "momentum_buffer": torch.float32,
        "grad_ema": torch.float32,
        "param_snapshot": torch.float32,
        "grad_snapshot": torch.float32,
    }


def test_step_hooks():
    """test_step_pre_hook, test_step_post_hook, test_step_all_hooks."""
    params = [Parameter(torch.tensor([1.0, 1.0]))]
    opt = MLBFGS(params)
    opt2 = SGD(params)
    data = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(0)),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(5)),
        opt.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt.register_step_post_hook(lambda o, a, k: data.append(2)),
        opt2.register_step_pre_hook(lambda o, a, k: data.append(1)),
        opt2.register_step_post_hook(lambda o, a, k: data.append(2)),
    ]
    try:
        opt.step()
        assert data == [0, 1, 2, 5]
        opt2.step()
        assert data == [0, 1, 2, 5] * 2
        opt.step()
        assert data == [0, 1, 2, 5] * 3
    finally:
        for handle in handles:
            handle.remove()
    opt.step()
    opt2.step()
    assert data == [0, 1, 2, 5] * 3


def test_step_pre_hook_may_replace_the_closure():
    param = Parameter(torch.randn(3))
    opt = MLBFGS([param])
    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, lambda: torch.tensor(7.0)), kwargs))
    assert opt.step(lambda: torch.tensor(1.0)).item() == 7.0


# -- 1. schedulers cycle momentum; a checkpoint saved with ``betas`` loads -------------
@pytest.mark.parametrize("make", ["onecycle", "cyclic"])
def test_momentum_schedulers_cycle_momentum_not_the_ema_decay(make):
    p = Parameter(torch.randn(4))
    opt = MLBFGS([p], ema_decay=(0.99, 0.995))
    if make == "onecycle":
        scheduler = OneCycleLR(opt, max_lr=0.1, total_steps=12)  # momentum 0.95 -> 0.85 -> 0.95
    else:
        scheduler = CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4)  # 0.9 -> 0.8 -> 0.9
    seen = set()
    for step in range(12):
        _random_grads([p], step)
        opt.step()
        scheduler.step()
        seen.add(opt.param_groups[0]["momentum"])
        assert opt.param_groups[0]["ema_decay"] == (0.99, 0.995)
    assert len(seen) >= 5 and min(seen) < 0.86 and 0.9 <= max(seen) <= 0.95


def test_checkpoint_saved_with_betas_loads_as_ema_decay():
    param, opt = _stepped_optimizer(steps=3)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        group["betas"] = (0.9, 0.95)  # the key's name before it was ema_decay
        del group["ema_decay"]
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["ema_decay"] == (0.9, 0.95) and "betas" not in opt.param_groups[0]
    _random_grads([param], 3)
    opt.step()
    # A pickled optimizer from then unpickles likewise.
    old = opt.__getstate__()
    old["param_groups"] = [{**g, "betas": g["ema_decay"]} for g in old["param_groups"]]
    for group in old["param_groups"]:
        del group["ema_decay"]
    restored = MLBFGS.__new__(MLBFGS)
    restored.__setstate__(old)
    assert restored.param_groups[0]["ema_decay"] == (0.9, 0.95)


# -- 5. named parameters ------------------------------------------------------------------
def test_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = MLBFGS(model.named_parameters(), backend="foreach", **FAST)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_named_parameters_name_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    named = list(model.named_parameters())
    opt = MLBFGS(named, blocks=[["0.weight", "1.weight"], ["0.bias", "1.bias"]])
    assert opt.param_groups[0]["blocks"] == [[0, 2], [1, 3]]
    opt = MLBFGS(named, blocks=[[named[0], named[1]], [named[2], named[3]]])  # pairs work too
    assert opt.param_groups[0]["blocks"] == [[0, 1], [2, 3]]
    # The constructor's blocks span groups; each named group keeps its own.
    opt = MLBFGS(
        [{"params": named[:2]}, {"params": named[2:]}],
        blocks=[["0.weight"], ["0.bias"], ["1.weight", "1.bias"]],
    )
    assert [g["blocks"] for g in opt.param_groups] == [[[0], [1]], [[0, 1]]]
    with pytest.raises(ValueError, match="'2.weight' that is not in the group"):
        MLBFGS([{"params": named, "blocks": [["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]]}])
    with pytest.raises(ValueError, match="'0.weight' that is not in the group"):
        MLBFGS(model.parameters(), blocks=[["0.weight"]])  # no names to look up


@pytest.mark.parametrize("named0", [True, False])
@pytest.mark.parametrize("named1", [True, False])
def test_can_load_from_to_named_state_dict(named0, named1):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
    inpt = torch.rand(1, 4, 16, 16)

    def fwd_bwd(o):
        o.zero_grad()
        loss = model(inpt).sum()
        loss.backward()
        return loss

    opt = MLBFGS(model.named_parameters() if named0 else model.parameters(), **FAST)
    for _ in range(3):
        opt.step(functools.partial(fwd_bwd, opt))
    opt2 = MLBFGS(model.named_parameters() if named1 else model.parameters(), **FAST)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt2.step(functools.partial(fwd_bwd, opt2))
    if named0 or named1:
        names = opt2.state_dict()["param_groups"][0]["param_names"]
        assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_add_param_group_with_names_to_a_named_optimizer():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    opt = MLBFGS(a.named_parameters())
    opt.add_param_group({"params": b.named_parameters(), "lr": 0.01})
    assert opt.param_groups[1]["param_names"] == ["weight", "bias"]
    with pytest.raises(ValueError, match="cannot add param group without names"):
        opt.add_param_group({"params": [Parameter(torch.randn(2))]})


# -- 6. older state dicts -------------------------------------------------------------------
NEWER_GROUP_KEYS = (
    "fused", "foreach", "maximize", "capturable", "differentiable",
    "variant", "history_dtype", "backend", "ema_decay",
)


@pytest.mark.parametrize("backend", BACKENDS)
def test_can_load_older_state_dict(backend):
    """test_can_load_older_state_dict: groups without the keys added since load with
    torch's (and our) defaults, and the optimizer keeps stepping exactly as before."""
    dev = backend_device(backend)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2)).to(dev)
    inpt = torch.rand(1, 4, 16, 16, device=dev)
    opt = MLBFGS(model.parameters(), backend=backend, **FAST)

    def fwd_bwd():
        opt.zero_grad()
        model(inpt).sum().backward()

    for _ in range(3):
        fwd_bwd()
        opt.step()
    current = copy.deepcopy(opt.state_dict())
    old = copy.deepcopy(current)
    for group in old["param_groups"]:
        for key in NEWER_GROUP_KEYS:
            del group[key]
        group["backend"] = backend  # the backend the run used, so both continue alike
    twin = copy.deepcopy(model)
    twin_opt = MLBFGS(twin.parameters(), backend=backend, **FAST)
    twin_opt.load_state_dict(current)
    opt.load_state_dict(old)
    group = opt.param_groups[0]
    assert (group["fused"], group["foreach"], group["maximize"], group["capturable"]) == (None, None, False, False)
    assert (group["differentiable"], group["variant"], group["history_dtype"]) == (False, "paper", None)
    assert group["ema_decay"] == (0.999, 0.999)
    fwd_bwd()
    opt.step()
    twin_opt.zero_grad()
    twin(inpt).sum().backward()
    twin_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_loading_a_bad_group_raises_before_anything_is_loaded():
    param, opt = _stepped_optimizer()
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(before)
    sd["param_groups"][0]["variant"] = "typo"
    sd["param_groups"][0]["lr"] = 5.0
    with pytest.raises(ValueError, match="Invalid variant"):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == before["param_groups"][0]["lr"]


# -- 9. a model converted after stepping ------------------------------------------------------
CONVERSIONS = [
    ("float64", "foreach"),
    *(pytest.param("float64", *b.values, marks=b.marks, id=f"float64-{b.id}") for b in BACKENDS if b.id != "foreach"),
    pytest.param(
        "cuda", "foreach", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
    ),
]


@pytest.mark.parametrize("to,backend", CONVERSIONS)
def test_model_converted_after_stepping_keeps_training(to, backend):
    """``model.to(torch.float64)`` (or to a GPU) after some steps: the state follows the
    parameters, and the run continues exactly as one resumed from a checkpoint into
    the converted model."""
    dev = backend_device(backend)
    target = dict(dtype=torch.float64) if to == "float64" else dict(device=to)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dev)
    opt = MLBFGS(model.parameters(), backend=backend, blocks="tensor", **FAST)
    x = torch.randn(16, 4, device=dev)

    def train(m, o, steps):
        p = next(m.parameters())
        for _ in range(steps):
            o.zero_grad()
            m(x.to(p.device, p.dtype)).pow(2).mean().backward()
            o.step()

    train(model, opt, 3)
    resumed = copy.deepcopy(model).to(**target)
    resumed_opt = MLBFGS(resumed.parameters(), backend=backend, blocks="tensor", **FAST)
    resumed_opt.load_state_dict(opt.state_dict())

    model.to(**target)
    train(model, opt, 3)  # pairs form and are used after the conversion
    train(resumed, resumed_opt, 3)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    _assert_same_state(opt, resumed_opt)
    first = next(model.parameters())
    assert first.dtype == target.get("dtype", torch.float32) and first.device.type == target.get("device", dev)
    state = opt.state[first]
    assert state["momentum_buffer"].dtype == first.dtype and state["momentum_buffer"].device == first.device
    assert state["gram"].dtype == torch.float64 and state["gram"].device == first.device
    assert int(state["block_step"]) == 6 and int(state["pair_count"]) == 2


def test_converting_part_of_a_block_raises_a_clear_error_and_changes_nothing():
    """A block lives on one dtype and device: converting some of its parameters would
    split it, and its history cannot be split. The error says so; undoing the
    conversion resumes the run where it was."""
    a, b = Parameter(torch.randn(5)), Parameter(torch.randn(3))
    opt = MLBFGS([a, b], **FAST)  # blocks="group": one block over a and b
    for step in range(5):
        _random_grads([a, b], step)
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    a.data = a.data.double()
    _random_grads([a, b], 5)
    with pytest.raises(RuntimeError, match="splitting or merging its blocks"):
        opt.step()
    a.data = a.data.float()
    _random_grads([a, b], 5)
    opt.step()
    assert int(opt.block_states(a)[0]["step"]) == int(before["state"][0]["block_step"]) + 1
    # Converting the whole block at once is fine.
    a.data, b.data = a.data.double(), b.data.double()
    _random_grads([a, b], 6)
    opt.step()
    assert opt.block_states(a)[0]["history_s"].dtype == torch.float64


def test_parameter_that_changed_shape_raises_a_clear_error():
    param, opt = _stepped_optimizer()
    with torch.no_grad():
        param.data = torch.randn(3, 3)
    param.grad = torch.randn(3, 3)
    with pytest.raises(RuntimeError, match=re.escape("changed shape from (2, 3) to (3, 3) after the optimizer stepped it")):
        opt.step()


