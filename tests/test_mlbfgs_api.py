"""MLBFGS as a torch.optim.Optimizer: arguments, groups, schedulers, closures, bad input."""

import copy
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mlbfgs_fused import MLBFGS
from problems import build_params, flat, make_optimizer, run_scenario, set_grads, standard_scenario


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr=-0.1), "Invalid learning rate: -0.1"),
        (dict(momentum=-0.5), "Invalid momentum value: -0.5"),
        (dict(momentum=1.0), "Invalid momentum value: 1.0"),
        (dict(weight_decay=-1e-4), "Invalid weight_decay value: -0.0001"),
        (dict(history_size=0), "Invalid history_size value: 0"),
        (dict(update_period=0), "Invalid update_period value: 0"),
        (dict(ema_decay=(1.0, 0.9)), "Invalid ema_decay value at index 0: 1.0"),
        (dict(ema_decay=(0.9, -0.1)), "Invalid ema_decay value at index 1: -0.1"),
        (dict(pair_momentum=1.5), "Invalid pair_momentum value: 1.5"),
        (dict(damping=1.0), "Invalid damping value: 1.0"),
        (dict(sigma_low=-0.01), "Invalid sigma_low value: -0.01"),
        (dict(sigma_high=0.9), "Invalid sigma_high value: 0.9"),
        (dict(eps=-1.0), "Invalid epsilon value: -1.0"),
        (dict(blocks="layer"), "Invalid blocks value"),
        (dict(blocks=0), "Invalid blocks value: 0"),
        (dict(blocks=[[]]), "non-empty lists"),
        (dict(history_dtype=torch.int32), "Invalid history_dtype"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
        (dict(backend="opencl"), "Invalid backend"),
        (dict(normalize="yes"), "Invalid normalize value: 'yes' (expected 'always', True or False)"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MLBFGS([_param(3)], **kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(lr="0.1"), "Invalid learning rate: '0.1' (lr must be a float or a 1-element Tensor, got str)"),
        (dict(lr=True), "Invalid learning rate: True (lr must be a float or a 1-element Tensor, got bool)"),
        (dict(lr=None), "Invalid learning rate: None"),
        (dict(lr=torch.tensor(1)), "Invalid learning rate: tensor(1) (a Tensor lr must be floating point)"),
        (dict(momentum=True), "Invalid momentum value: True (momentum must be a float, got bool)"),
        (dict(momentum="0.9"), "Invalid momentum value: '0.9'"),
        (dict(weight_decay=False), "Invalid weight_decay value: False"),
        (dict(pair_momentum="0"), "Invalid pair_momentum value: '0'"),
        (dict(damping=[0.01]), "Invalid damping value: [0.01]"),
        (dict(sigma_low=True), "Invalid sigma_low value: True"),
        (dict(sigma_high="2"), "Invalid sigma_high value: '2'"),
        (dict(eps=False), "Invalid epsilon value: False (eps must be a float, got bool)"),
        (dict(history_size=2.5), "Invalid history_size value: 2.5 (history_size must be an int, got float)"),
        (dict(history_size=True), "Invalid history_size value: True"),
        (dict(update_period="50"), "Invalid update_period value: '50'"),
        (dict(ema_decay=0.9), "Invalid ema_decay: 0.9 (expected a pair of floats)"),
        (dict(ema_decay="ab"), "Invalid ema_decay: 'ab'"),
        (dict(ema_decay=(0.9, True)), "Invalid ema_decay value at index 1: True"),
        (dict(normalize=1), "Invalid normalize value: 1 (normalize must be 'always', True or False)"),
        (dict(maximize=1), "Invalid maximize value: 1"),
        (dict(foreach="no"), "Invalid foreach value: 'no' (foreach must be a bool or None)"),
    ],
)
def test_hyperparameters_of_the_wrong_type_raise_type_error_naming_them(kwargs, message):
    """A string or a bool where a number is expected is a TypeError naming the key, in
    torch's wording ("Invalid learning rate: ..."), never a bare comparison error."""
    with pytest.raises(TypeError, match=re.escape(message)):
        MLBFGS([_param(3)], **kwargs)
    with pytest.raises(TypeError, match=re.escape(message)):  # a group's own value too
        MLBFGS([{"params": [_param(3)], **kwargs}])


def test_numbers_of_other_types_are_accepted():
    import numpy as np

    MLBFGS([_param(3)], lr=np.float32(0.1), momentum=0, history_size=np.int64(3), ema_decay=[0.9, 0.99])
    MLBFGS([_param(3)], lr=torch.tensor(0.1), eps=0)


def test_flag_conflicts_use_torch_wording():
    with pytest.raises(RuntimeError, match=r"`fused` and `foreach` cannot be `True` together."):
        MLBFGS([_param(3)], fused=True, foreach=True)
    with pytest.raises(RuntimeError, match=r"`fused` does not support `differentiable`"):
        MLBFGS([_param(3)], fused=True, differentiable=True)
    with pytest.raises(RuntimeError, match="differentiable"):
        MLBFGS([_param(3)], differentiable=True)
    # A group's own flags are held to the same rules.
    with pytest.raises(RuntimeError, match=r"`fused` and `foreach` cannot be `True` together."):
        MLBFGS([{"params": [_param(3)], "fused": True, "foreach": True}])
    with pytest.raises(RuntimeError, match="MLBFGS does not support `differentiable`"):
        MLBFGS([{"params": [_param(3)], "differentiable": True}])
    with pytest.raises(RuntimeError, match="`fused=True` contradicts `backend='foreach'`"):
        MLBFGS([{"params": [_param(3)], "backend": "foreach", "fused": True}])
    with pytest.raises(ValueError, match="Invalid backend: 'opencl'"):
        MLBFGS([{"params": [_param(3)], "backend": "opencl"}])


def test_invalid_group_leaves_optimizer_unchanged():
    opt = MLBFGS([_param(3)])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [_param(2)], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_blocks_lists_must_cover_group():
    a, b, c = _param(3), _param(4), _param(5)
    with pytest.raises(ValueError, match="exactly once"):
        MLBFGS([a, b, c], blocks=[[a], [b]])
    opt = MLBFGS([a, b, c], blocks=[[a, c], [b]])
    assert opt.param_groups[0]["blocks"] == [[0, 2], [1]]


def test_sparse_and_complex_gradients_raise_before_any_write():
    a, b = _param(4), _param(3)
    opt = MLBFGS([{"params": [a]}, {"params": [b]}], backend="foreach")
    a.grad = torch.randn(4)
    b.grad = torch.randn(3).to_sparse()
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(a, before) and len(opt.state) == 0  # group 0 was not stepped either
    with pytest.raises(ValueError, match="complex"):
        MLBFGS([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_nan_gradient_step_changes_nothing_but_the_counter():
    sc = standard_scenario("tensor", steps=30)
    opt, groups = run_scenario(sc, stop=23, backend="foreach")  # history has wrapped
    before_params = [flat(g) for g in groups]
    before_state = copy.deepcopy(opt.state_dict()["state"])
    set_grads(sc, groups, 23)
    groups[1][0].grad[3] = float("nan")  # one entry of one group
    groups[0][2].grad[0, 0, 0] = float("inf")
    opt.step()
    for g, b in zip(groups, before_params):
        assert torch.equal(flat(g), b)
    after_state = opt.state_dict()["state"]
    for pid, st in before_state.items():
        for key, value in st.items():
            expected = value + 1 if key == "skipped_steps" else value
            assert torch.equal(after_state[pid][key], expected), key


def test_nan_in_one_group_skips_the_whole_step():
    """The loss that produced a NaN anywhere is not trusted elsewhere: every group is skipped."""
    sc = standard_scenario("group", steps=3)
    groups = build_params(sc, torch.float32)
    opt = make_optimizer(sc, groups, backend="foreach")
    set_grads(sc, groups, 0)
    groups[1][1].grad[0, 0] = float("nan")
    before = [flat(g) for g in groups]
    opt.step()
    for g, b in zip(groups, before):
        assert torch.equal(flat(g), b)
    for group in opt.param_groups:
        blocks = opt.block_states(group["params"][0])
        assert all(int(blk["skipped_steps"]) == 1 and int(blk["step"]) == 0 for blk in blocks)


class _NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("step() read a tensor value on the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("lr", [0.05, "tensor"])
def test_step_never_reads_device_values(lr):
    sc = standard_scenario("tensor", steps=26)
    if lr == "tensor":
        for h in sc.hyper:
            h["lr"] = torch.tensor(h["lr"])
    groups = build_params(sc, torch.float32)
    opt = make_optimizer(sc, groups, backend="foreach")
    for step in range(sc.steps):  # covers warm-up, pair updates, a skipped pair, wrap
        set_grads(sc, groups, step)
        with _NoHostSync():
            opt.step()
    assert int(opt.block_states(groups[0][0])[0]["pair_count"]) > 0


def test_the_sync_detector_can_fail():
    with pytest.raises(AssertionError, match="host"):
        with _NoHostSync():
            torch.ones(2).sum().item()


def test_closure_runs_with_grad_and_returns_loss():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    opt = MLBFGS(model.parameters(), lr=0.05, update_period=2, history_size=2)

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    assert losses[-1] < 0.9 * losses[0]


def test_lr_scheduler_drives_lr_float_and_tensor():
    for lr in (0.1, torch.tensor(0.1)):
        p = _param(4)
        opt = MLBFGS([p], lr=lr, momentum=0.0, normalize=False, update_period=1000)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for expected in (0.1, 0.05, 0.025):
            p.grad = torch.randn(4)
            before = p.detach().clone()
            opt.step()
            sched.step()
            # Warm-up (no pairs): theta -= lr * g exactly.
            torch.testing.assert_close(p.detach(), before - expected * p.grad)


def test_cosine_schedule_and_layerwise_lr_groups():
    layers = [_param(6, 6) for _ in range(4)]
    groups = [{"params": [w], "lr": 0.1 * 0.5**i} for i, w in enumerate(layers)]
    opt = MLBFGS(groups, update_period=3, history_size=2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(10):
        for w in layers:
            w.grad = torch.randn_like(w)
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [0.1 * 0.5**i * 0.0 for i in range(4)], abs=1e-12
    )


def test_add_param_group_mid_run():
    a, b = _param(5), _param(3)
    opt = MLBFGS([a], update_period=2, history_size=2)
    for _ in range(5):
        a.grad = torch.randn(5)
        opt.step()
    opt.add_param_group({"params": [b], "lr": 0.01, "blocks": "tensor"})
    b_before = b.detach().clone()
    for _ in range(5):
        a.grad, b.grad = torch.randn(5), torch.randn(3)
        opt.step()
    assert not torch.equal(b, b_before)
    assert float(opt.block_states(a)[0]["step"]) == 10
    assert float(opt.block_states(b)[0]["step"]) == 5


def test_parameters_without_gradient_are_untouched():
    a, b = _param(5), _param(3)
    opt = MLBFGS([a, b], blocks="tensor")
    b_before = b.detach().clone()
    for _ in range(4):
        a.grad = torch.randn(5)
        opt.step()
    assert torch.equal(b, b_before)
    assert torch.equal(opt.state[b]["momentum_buffer"], torch.zeros(3))
    c = _param(2)
    opt2 = MLBFGS([c])
    assert opt2.step() is None and len(opt2.state) == 0  # no gradient at all: nothing happens


def test_zero_grad_and_step_on_module():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = MLBFGS(model.parameters(), blocks="tensor")
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
