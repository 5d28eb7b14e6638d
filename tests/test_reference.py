"""The float64 reference against cases that can be derived by hand."""

import pytest
import torch

from mlbfgs_fused._state.layout import arena_layout
from mlbfgs_fused._math import damping_factor, two_loop_coefficients
from mlbfgs_fused.reference import ReferenceGroup


def _quadratic(n, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.5, 1.4, n, dtype=torch.float64)) @ q.T
    theta0 = torch.randn(n, generator=gen, dtype=torch.float64)
    return A, theta0


def test_secant_condition_on_a_quadratic():
    """With exact gradients of a quadratic whose curvature lies inside
    [sigma_low, sigma_high] and damping 0, y = A s and the newest pair satisfies H y = s."""
    A, theta0 = _quadratic(12, 0)
    ref = ReferenceGroup(theta0, [0, 12], update_period=3, history_size=4, ema_decay=(0.5, 0.5),
                         pair_momentum=0.0, damping=0.0, lr=0.05)
    for _ in range(30):
        ref.step(A @ ref.theta)
    assert len(ref.blocks[0].pairs) == 4 and ref.blocks[0].damped_pairs == 0
    for s, y in ref.blocks[0].pairs:
        torch.testing.assert_close(y, A @ s)  # EMAs of a linear map: exact secant pairs
    s, y = ref.blocks[0].pairs[-1]
    torch.testing.assert_close(ReferenceGroup.two_loop(y, ref.blocks[0].pairs), s)


def test_damping_brings_curvature_into_bounds():
    gen = torch.Generator().manual_seed(1)
    lo, hi = 0.01, 1.5
    for _ in range(200):
        s = torch.randn(20, generator=gen, dtype=torch.float64)
        y = torch.randn(20, generator=gen, dtype=torch.float64) * 3 + s * torch.randn(1, generator=gen, dtype=torch.float64) * 4
        phi = damping_factor(s.dot(y), s.dot(s), lo, hi, 0.0, 1e-12)
        yhat = phi * y + (1 - phi) * s
        ratio = (s.dot(yhat) / s.dot(s)).item()
        mu = (s.dot(y) / s.dot(s)).item()
        if lo <= mu <= hi:
            assert phi.item() == 1.0
        else:
            assert lo - 1e-9 <= ratio <= hi + 1e-9
            assert ratio == pytest.approx(lo if mu < lo else hi)


def _run(theta0, grads, **hyper):
    ref = ReferenceGroup(theta0, [0, len(theta0)], **hyper)
    for g in grads:
        ref.step(g)
    return ref


def test_warm_up_is_sgd_with_heavy_ball():
    """Before the first pair (t < 2T + 1) the paper's step (``normalize=True``) is plain
    heavy-ball SGD on g; the default (``"always"``) steps along g / ||g||."""
    gen = torch.Generator().manual_seed(2)
    theta0 = torch.randn(9, generator=gen, dtype=torch.float64)
    grads = [torch.randn(9, generator=gen, dtype=torch.float64) for _ in range(7)]
    for normalize in (True, "always"):
        ref = _run(theta0, grads, update_period=4, lr=0.1, momentum=0.8, weight_decay=0.0, normalize=normalize)
        theta, buf = theta0.clone(), torch.zeros(9, dtype=torch.float64)
        for g in grads:
            buf = 0.8 * buf + (g if normalize is True else g / g.norm())
            theta = theta - 0.1 * buf
        torch.testing.assert_close(ref.theta, theta)


def test_momentum_zero_and_normalize_false_reduce_to_plain_quasi_newton():
    gen = torch.Generator().manual_seed(3)
    A, theta0 = _quadratic(8, 3)
    ref = ReferenceGroup(theta0, [0, 8], update_period=2, history_size=3, momentum=0.0,
                         normalize=False, lr=0.3)
    for _ in range(12):
        before = ref.theta.clone()
        g = A @ ref.theta + 0.01 * torch.randn(8, generator=gen, dtype=torch.float64)
        pairs = list(ref.blocks[0].pairs)
        ref.step(g)
        torch.testing.assert_close(ref.theta, before - 0.3 * ReferenceGroup.two_loop(g, pairs))
    assert ref.blocks[0].pairs


def test_normalize_divides_by_group_norm_across_blocks():
    A, theta0 = _quadratic(10, 4)
    ref = ReferenceGroup(theta0, [0, 4, 10], update_period=2, history_size=2, momentum=0.0, lr=0.2)
    for _ in range(6):
        ref.step(A @ ref.theta)
    before = ref.theta.clone()
    g = A @ ref.theta
    d = torch.cat([ReferenceGroup.two_loop(g[:4], ref.blocks[0].pairs),
                   ReferenceGroup.two_loop(g[4:], ref.blocks[1].pairs)])
    ref.step(g)
    torch.testing.assert_close(ref.theta, before - 0.2 * d / d.norm())


def test_pair_momentum_zero_uses_raw_ema_differences():
    gen = torch.Generator().manual_seed(5)
    theta0 = torch.randn(6, generator=gen, dtype=torch.float64)
    grads = [torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(12)]
    ref = ReferenceGroup(theta0, [0, 6], update_period=3, pair_momentum=0.0, ema_decay=(0.5, 0.5),
                         damping=0.0, sigma_low=0.0, sigma_high=1e9)
    snapshots = []
    for t, g in enumerate(grads, start=1):
        ref.step(g)
        if t % 3 == 0:
            snapshots.append((ref.param_ema.clone(), ref.grad_ema.clone()))
    s_expected = [p1 - p0 for (p0, _), (p1, _) in zip(snapshots, snapshots[1:])]
    y_expected = [g1 - g0 for (_, g0), (_, g1) in zip(snapshots, snapshots[1:])]
    kept = [(s, y) for s, y in zip(s_expected, y_expected) if s.dot(y) > 1e-12]
    assert len(ref.blocks[0].pairs) == len(kept) > 0
    for (s, y), (s_ref, y_ref) in zip(kept, ref.blocks[0].pairs):
        torch.testing.assert_close(s_ref, s)
        torch.testing.assert_close(y_ref, y)


def test_two_loop_coefficients_match_vector_two_loop():
    """The vector-free recursion shared by the backends equals the classic one,
    for empty, partial and wrapped rings."""
    gen = torch.Generator().manual_seed(6)
    n, m = 40, 4
    for count in [0, 1, 3, 4, 7]:
        S = torch.randn(m, n, generator=gen, dtype=torch.float64)
        Y = S + 0.3 * torch.randn(m, n, generator=gen, dtype=torch.float64)
        g = torch.randn(n, generator=gen, dtype=torch.float64)
        held = min(count, m)
        oldest_first = [(count - 1 - k) % m for k in range(held)][::-1]
        for j in set(range(m)) - set(oldest_first):
            S[j] = Y[j] = 0  # unheld slots of a ring are zero
        expected = ReferenceGroup.two_loop(g, [(S[j], Y[j]) for j in oldest_first])
        gram = torch.stack([S @ S.T, S @ Y.T, Y @ Y.T])[None]
        c_g, c_s, c_y, dd = two_loop_coefficients(gram, (S @ g)[None], (Y @ g)[None], (g @ g)[None],
                                                  torch.tensor([count]))
        d = c_g[0] * g + c_s[0] @ S + c_y[0] @ Y
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dd[0], d.dot(d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "numels,spec,order,bounds",
    [
        ([3, 4, 5], "group", (0, 1, 2), (0, 12)),
        ([3, 4, 5], "tensor", (0, 1, 2), (0, 3, 7, 12)),
        ([3, 4, 5], 5, (0, 1, 2), (0, 4, 8, 12)),  # 3 chunks of 4, not 5 + 5 + 2
        ([3, 4, 5], 12, (0, 1, 2), (0, 12)),
        ([3, 4, 5], [[2, 0], [1]], (2, 0, 1), (0, 8, 12)),
    ],
)
def test_arena_layout(numels, spec, order, bounds):
    layout = arena_layout(numels, spec)
    assert layout.order == order and layout.block_bounds == bounds


# -- variant="released" ---------------------------------------------------------------
_HAND = dict(lr=0.25, momentum=0.0, normalize=False, update_period=2, ema_decay=(0.5, 0.5),
             pair_momentum=0.0, damping=0.0, sigma_low=0.0, sigma_high=1e9)


def _one_d(variant, steps):
    """f = theta^2 (grad 2 theta) from theta = 1; returns the group and theta after each step."""
    ref = ReferenceGroup(torch.tensor([1.0], dtype=torch.float64), [0, 1], variant=variant, **_HAND)
    thetas = []
    for _ in range(steps):
        ref.step(2 * ref.theta)
        thetas.append(ref.theta.item())
    return ref, thetas


def test_released_variant_by_hand_one_dimension():
    """Derived on paper, T = 2, beta = 0.5, no momentum, no normalisation. In 1-D the
    two-loop gives d = (s / yhat) g for the newest pair.

    t  g      P (E1)          G (E1)            due: pair, snapshots, reset (E2)      d (E4)
    1  2      1               2                                                        2
    2  1      .5*1+.5  = 1    .5*2+1   = 2      P0=1 G0=2, G=g=1                       1
    3  .5     .5*1+.25 = .75  .5*1+.5  = 1                                             .5
    4  .25    .375+.125= .5   .5+.25   = .75    s=-.5 y=-1.25; P0=.5 G0=.75, G=.25     .4*.25=.1
    5  .2     .25+.1   = .35  .125+.2  = .325                                          .4*.2=.08
    6  .16    .175+.08 = .255 .1625+.16= .3225  s=-.245 y=-.4275                       .16*.245/.4275
    """
    ref, thetas = _one_d("released", 4)
    assert thetas == pytest.approx([0.5, 0.25, 0.125, 0.1], abs=1e-15)
    (s, y), = ref.blocks[0].pairs
    assert (s.item(), y.item()) == pytest.approx((-0.5, -1.25), abs=1e-15)
    assert ref.param_ema.item() == pytest.approx(0.5) and ref.grad_ema.item() == pytest.approx(0.25)
    assert ref.blocks[0].param_snapshot.item() == pytest.approx(0.5)
    assert ref.blocks[0].grad_snapshot.item() == pytest.approx(0.75)  # taken before the reset
    ref, thetas = _one_d("released", 6)
    expected_6 = 0.08 - 0.25 * 0.16 * 0.245 / 0.4275
    assert thetas == pytest.approx([0.5, 0.25, 0.125, 0.1, 0.08, expected_6], abs=1e-15)
    pairs = [value.item() for pair in ref.blocks[0].pairs for value in pair]  # (s, y) in order
    assert pairs == pytest.approx([-0.5, -1.25, -0.245, -0.4275], abs=1e-15)


def test_paper_variant_uses_the_pair_one_step_later():
    """The same problem under the paper's math: averages with (1 - beta), the pair of
    step 4 (s = .5 - 1 ... of the averages) first used at step 5."""
    ref, thetas = _one_d("paper", 4)
    assert thetas == pytest.approx([0.5, 0.25, 0.125, 0.0625], abs=1e-15)  # d = g at step 4
    assert len(ref.blocks[0].pairs) == 1
    # P: 1, .75, .5, .3125 (snapshot at 2: .75); G: 2, 1.5, 1, .625 (snapshot: 1.5) -> y = 2 s
    (s, y), = ref.blocks[0].pairs
    assert (s.item(), y.item()) == pytest.approx((-0.4375, -0.875), abs=1e-15)


def test_released_variant_update_period_one():
    """T = 1: a snapshot at step 1, the first pair at step 2, used at step 2 (see the
    reference's docstring; the released code would wait until step 3)."""
    hyper = {**_HAND, "update_period": 1, "ema_decay": (0.0, 0.0)}  # P = theta, G = g
    ref = ReferenceGroup(torch.tensor([1.0], dtype=torch.float64), [0, 1], variant="released", **hyper)
    ref.step(2 * ref.theta)  # g = 2, d = 2, theta = .5
    assert not ref.blocks[0].pairs and ref.blocks[0].param_snapshot.item() == 1.0
    ref.step(2 * ref.theta)  # g = 1: s = .5 - 1, y = 1 - 2, d = (s / y) g = .5
    (s, y), = ref.blocks[0].pairs
    assert (s.item(), y.item()) == (-0.5, -1.0)
    assert ref.theta.item() == 0.5 - 0.25 * 0.5


def test_released_variant_leaves_entries_without_gradient_alone():
    gen = torch.Generator().manual_seed(7)
    theta0 = torch.randn(6, generator=gen, dtype=torch.float64)
    ref = ReferenceGroup(theta0, [0, 3, 6], variant="released", update_period=2, history_size=2)
    mask = torch.tensor([True] * 4 + [False] * 2)
    for _ in range(9):
        ref.step(torch.randn(6, generator=gen, dtype=torch.float64), mask)
    assert torch.equal(ref.theta[4:], theta0[4:])
    assert torch.equal(ref.grad_ema[4:], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(ref.param_ema[4:], theta0[4:])
    assert ref.blocks[0].pairs and not torch.equal(ref.theta[:4], theta0[:4])


def test_skip_flag_changes_nothing_but_the_counter():
    gen = torch.Generator().manual_seed(8)
    ref = ReferenceGroup(torch.randn(5, generator=gen, dtype=torch.float64), [0, 5], update_period=2)
    for _ in range(5):
        ref.step(torch.randn(5, generator=gen, dtype=torch.float64))
    before = (ref.theta.clone(), ref.buf.clone(), ref.param_ema.clone(), ref.grad_ema.clone(), ref.t)
    ref.step(torch.randn(5, generator=gen, dtype=torch.float64), skip=True)
    after = (ref.theta, ref.buf, ref.param_ema, ref.grad_ema, ref.t)
    assert all(torch.equal(a, b) for a, b in zip(before[:4], after[:4])) and before[4] == after[4]
    assert ref.skipped_steps == 1
