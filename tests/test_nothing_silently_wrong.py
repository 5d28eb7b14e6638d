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
        for block_a, block_b in zip(opt_a.state[pa].get("blocks", []), opt_b.state[pb].get("blocks", [])):
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
    assert opt_moved.state[moved[0].weight]["blocks" if blocks == "tensor" else "momentum_buffer"] is not None
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
            if key == "blocks":
                for block_a, block_b in zip(value, b["state"][pid]["blocks"]):
                    for k in block_a:
                        assert torch.equal(block_a[k], block_b[k]), (pid, k)
            else:
                assert torch.equal(value, b["state"][pid][key]), (pid, key)
