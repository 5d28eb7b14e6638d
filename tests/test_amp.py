"""GradScaler hands MLBFGS its scale and inf checks (``_step_supports_amp_scaling``), as
torch's fused optimizers take them: the scale is divided out while ``g`` is gathered
(``.grad`` is left scaled), and ``found_inf != 0`` skips the step on the device."""

import pytest
import torch

from mlbfgs_fused import MLBFGS

HYPER = dict(lr=0.05, update_period=3, history_size=2, ema_decay=(0.8, 0.9), weight_decay=0.01,
             backend="foreach", normalize=True)  # the paper's warm-up: an SGD step to check by hand
STEPS = 14


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(STEPS)]


def _loss(model, x, y, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    return torch.nn.functional.mse_loss(out.float(), y)


def _train_plain(autocast=False):
    model = _model()
    opt = MLBFGS(model.parameters(), **HYPER)
    for x, y in _batches():
        opt.zero_grad()
        _loss(model, x, y, autocast).backward()
        opt.step()
    return model, opt


def _train_scaled(unscale_first: bool, inject_inf_at: int | None = None, autocast=False):
    model = _model()
    opt = MLBFGS(model.parameters(), **HYPER)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scales = []
    for i, (x, y) in enumerate(_batches()):
        opt.zero_grad()
        scaler.scale(_loss(model, x, y, autocast)).backward()
        if i == inject_inf_at:
            next(model.parameters()).grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


def _state(model, opt):
    """Parameters and state, but for the count of skipped steps (the one thing a skip moves)."""
    return [p.detach().clone() for p in model.parameters()] + [
        v.clone() for s in opt.state.values() for k, v in sorted(s.items()) if k != "skipped_steps"
    ]


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast-bf16"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-unscale", "user-unscale_"])
def test_grad_scaler_matches_unscaled_training(unscale_first, autocast):
    """A power-of-two scale divides out exactly: the run equals the unscaled one to the bit
    (float32 model, forward in float32 or under CPU autocast)."""
    model, opt = _train_plain(autocast)
    model_s, opt_s, scales = _train_scaled(unscale_first, autocast=autocast)
    assert scales == [2.0**12] * STEPS  # no inf: the scale never backed off
    for a, b in zip(_state(model, opt), _state(model_s, opt_s)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    block = opt_s.block_states(next(model_s.parameters()))[0]
    assert int(block["pair_count"]) > 0 and int(block["skipped_steps"]) == 0


def test_step_leaves_scaled_gradients_in_place():
    model = _model()
    opt = MLBFGS(model.parameters(), **HYPER)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batches()[0]
    scaler.scale(_loss(model, x, y)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    scaler.step(opt)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)  # not unscaled in place
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # GradScaler cleaned up


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused-unscale", "user-unscale_"])
def test_injected_inf_skips_the_step_and_backs_off_the_scale(unscale_first):
    model_s, opt_s, scales = _train_scaled(unscale_first, inject_inf_at=STEPS - 1)
    assert scales[-1] == scales[-2] / 2
    # Nothing but skipped_steps moved at the last step: compare with a run one step shorter.
    model, opt = _model(), None
    opt = MLBFGS(model.parameters(), **HYPER)
    for x, y in _batches()[: STEPS - 1]:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    for a, b in zip(_state(model, opt), _state(model_s, opt_s)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    block = opt_s.block_states(next(model_s.parameters()))[0]
    assert int(block["skipped_steps"]) == 1 and int(block["step"]) == STEPS - 1


@pytest.mark.parametrize("found_inf,moves", [(0.0, True), (1.0, False), (2.0, False)])
def test_found_inf_is_a_sum_over_devices(found_inf, moves):
    """GradScaler sums its per-device inf flags: 2 means two devices saw one."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(7))
    opt = MLBFGS([p], **HYPER)
    p.grad = torch.randn(7) * 8.0
    before = p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.tensor(found_inf)
    opt.step()
    del opt.grad_scale, opt.found_inf
    block = opt.block_states(p)[0]
    assert int(block["skipped_steps"]) == (0 if moves else 1)
    if moves:  # first step: theta - lr * (grad / 8 + wd * theta)
        expected = before - HYPER["lr"] * (p.grad / 8.0 + HYPER["weight_decay"] * before)
        torch.testing.assert_close(p.detach(), expected)
    else:
        assert torch.equal(p.detach(), before)
