"""Each Triton kernel against a plain-torch computation of the same quantity.

The kernels run through the optimizer's own plumbing (an MLBFGS with
``backend="triton"`` builds the arena, the program table and the scratch), on
random state: odd sizes (N not a multiple of the tile), several blocks cutting
across parameters, m = 1 and histories holding fewer pairs than m, wrapped rings.
"""

import pytest
import torch

from mlbfgs_fused import MLBFGS
from mlbfgs_fused.backends import triton as _triton
from mlbfgs_fused._math import damping_factor, normalize_mode, two_loop_coefficients

pytestmark = pytest.mark.skipif(
    not _triton.available(), reason="Triton does not import"
)

NUMELS = [37, 5, 50]  # N = 92
TILE = 16  # several tiles per block, short tail tiles
WORKERS = 2  # at most two workers per block: a worker loops over several tiles


def _device():
    return "cpu" if _triton.interpreting() else "cuda"


class Fused:
    """An MLBFGS on the Triton backend, its arena plan and helpers over arena-flat data."""

    def __init__(self, monkeypatch, m=3, blocks=50, history_dtype=None, **hyper):
        monkeypatch.setattr(_triton, "TILE", TILE)
        monkeypatch.setattr(_triton, "WORKERS", WORKERS)
        gen = torch.Generator().manual_seed(m * 7 + len(str(blocks)))
        self.gen = gen
        dev = _device()
        self.params = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dev)) for n in NUMELS]
        self.opt = MLBFGS(
            self.params, backend="triton", history_size=m, blocks=blocks,
            history_dtype=history_dtype, **hyper,
        )
        self.group = self.opt.param_groups[0]
        (self.arena,) = self.opt._group_arenas(0, self.group)
        for p in self.params:
            p.grad = torch.randn(p.shape, generator=gen).to(dev)
        self.plan = self.opt.backend_plan(0)
        assert self.plan.prepare(self.group)
        (self.ap,) = self.plan.arenas
        self.m, self.n = m, self.arena.layout.numel
        self.bounds = self.arena.layout.block_bounds
        self.B = self.arena.layout.num_blocks

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(_device())

    def block(self, b):
        return slice(self.bounds[b], self.bounds[b + 1])

    def ring(self, history, b):
        return self.arena.history_view(history, b).double()

    def fill_history(self, pair_counts):
        """Random pairs with positive curvature in the held slots, zeros elsewhere,
        and the matching Gram matrices."""
        a = self.arena
        for b, count in enumerate(pair_counts):
            n_b = self.bounds[b + 1] - self.bounds[b]
            S = self.randn(self.m, n_b)
            Y = S * (1.0 + self.randn(n_b).abs()) + 0.1 * self.randn(self.m, n_b)
            held = torch.arange(self.m, device=S.device) < min(count, self.m)
            S, Y = S * held[:, None], Y * held[:, None]
            a.history_view(a.history_s, b).copy_(S)
            a.history_view(a.history_y, b).copy_(Y)
            a.counters["pair_count"][b] = count
        self.recompute_gram()

    def recompute_gram(self):
        for b in range(self.B):
            S, Y = self.ring(self.arena.history_s, b), self.ring(self.arena.history_y, b)
            self.arena.gram[b] = torch.stack([S @ S.T, S @ Y.T, Y @ Y.T])

    def block_sums(self, partials):
        """Per-block sums of per-program partial rows (the kernels' second stage)."""
        table = self.ap.blocks.cpu()
        return torch.stack([partials[table[b, 2] : table[b, 3]].sum(0) for b in range(self.B)])

    def gradient(self, present):
        g = torch.cat(
            [torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in self.params]
        ).double()
        theta = torch.cat([p.detach().reshape(-1) for p in self.params]).double()
        if self.group["maximize"]:
            g = -g
        g = g + self.group["weight_decay"] * theta  # torch's order: decay pulls toward zero
        return torch.where(present, g, 0.0)

    def present_mask(self):
        return torch.cat(
            [torch.full((p.numel(),), p.grad is not None, device=p.device) for p in self.params]
        )


# -- pass 1 -----------------------------------------------------------------------
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("history_dtype", [None, torch.bfloat16], ids=["f32", "bf16"])
def test_pass1_inner_products(monkeypatch, m, history_dtype):
    f = Fused(monkeypatch, m=m, history_dtype=history_dtype, weight_decay=0.1, maximize=True)
    f.fill_history([m + 2, 1])
    f.params[1].grad = None  # a parameter without gradient counts as zero
    f.params[2].grad[3] = 1e30  # huge but finite: g.g stays finite in float64
    assert f.plan.prepare(f.group)
    f.ap.gradient_dots(f.group, None)

    g = f.gradient(f.present_mask())
    sums = f.block_sums(f.ap.dot_partials)
    for b in range(f.B):
        g_b = g[f.block(b)]
        S, Y = f.ring(f.arena.history_s, b), f.ring(f.arena.history_y, b)
        expected = torch.cat([S @ g_b, Y @ g_b, (g_b @ g_b).view(1)])
        torch.testing.assert_close(sums[b], expected, rtol=1e-5, atol=1e-4 * g_b.norm().item())
    assert torch.isfinite(sums[:, -1]).all()


# -- the coefficient kernel -----------------------------------------------------------
@pytest.mark.parametrize("m,pair_counts", [(1, [0, 3]), (3, [0, 2]), (3, [5, 3]), (4, [1, 9])])
def test_coefficients_match_two_loop(monkeypatch, m, pair_counts):
    f = Fused(monkeypatch, m=m)
    f.fill_history(pair_counts)
    f.ap.dot_partials.copy_(f.randn(*f.ap.dot_partials.shape))
    f.ap.dot_partials[:, -1].abs_()  # g.g >= 0
    f.ap.two_loop(f.group)

    sums = f.block_sums(f.ap.dot_partials)
    Sg, Yg, gg = sums[:, :m], sums[:, m : 2 * m], sums[:, 2 * m]
    c_g, c_s, c_y, d_dot_d = two_loop_coefficients(
        f.arena.gram, Sg, Yg, gg, f.arena.counters["pair_count"]
    )
    expected = torch.cat([c_g[:, None], c_s, c_y], dim=1)
    torch.testing.assert_close(f.ap.coef, expected, rtol=1e-9, atol=1e-12)
    stats = f.plan.geometry.stats[f.arena.device]
    torch.testing.assert_close(stats[:, 0], gg, rtol=1e-12, atol=0)
    torch.testing.assert_close(f.ap.probe, f.ap.dot_partials[:, -1].sum(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats[:, 1], d_dot_d, rtol=1e-9, atol=1e-12)
    assert stats[:, 2].tolist() == [float(c > 0) for c in pair_counts]
    # The warm-up: no pair held gives d = g.
    for b, count in enumerate(pair_counts):
        if count == 0:
            assert f.ap.coef[b].tolist() == [1.0] + [0.0] * (2 * m)


# -- pass 2 -----------------------------------------------------------------------
def _ok(value=True):
    return torch.tensor(value, device=_device())


def _direction_scale(f):
    """The group's scale of d from the stats rows, as the step computes it before pass 2."""
    dev = f.arena.device
    f.plan.kernels.two_loop.direction_scale(f.plan.geometry.stats[dev], f.plan.d_scale[dev], normalize_mode(f.group["normalize"]))


def _random_state(f, step):
    a = f.arena
    for key in ("param_ema", "grad_ema", "momentum_buffer", "param_snapshot", "grad_snapshot"):
        a.flat_state[key].copy_(f.randn(f.n))
    f.ap.coef.copy_(f.randn(*f.ap.coef.shape))
    held = (a.counters["pair_count"] > 0).double()
    stats = f.plan.geometry.stats[a.device]
    stats[:, 0] = f.randn(f.B).abs()
    stats[:, 1] = f.randn(f.B).abs()
    stats[:, 2] = held
    a.counters["step"].fill_(step)


def _expected_pass2(f, step, present):
    """docs/design.md, "The step", 3-6, in float64 on arena-flat vectors."""
    a, h = f.arena, f.group
    st = {k: v.double().clone() for k, v in a.flat_state.items()}
    theta = torch.cat([p.detach().reshape(-1) for p in f.params]).double()
    g = f.gradient(present)
    w_p, w_g = (1.0, 1.0) if step == 0 else (1 - h["ema_decay"][0], 1 - h["ema_decay"][1])
    P = torch.where(present, torch.lerp(st["param_ema"], theta, w_p), st["param_ema"])
    G = torch.where(present, torch.lerp(st["grad_ema"], g, w_g), st["grad_ema"])
    d = torch.empty_like(g)
    m = f.m
    for b in range(f.B):
        sl, c = f.block(b), f.ap.coef[b]
        S, Y = f.ring(a.history_s, b), f.ring(a.history_y, b)
        d[sl] = c[0] * g[sl] + c[1 : m + 1] @ S + c[m + 1 :] @ Y
    stats = f.plan.geometry.stats[a.device]
    norm = stats[:, 1].sum().sqrt()
    if h["normalize"] and stats[:, 2].sum() > 0 and norm > 0:
        d = d / norm
    buf = torch.where(present, h["momentum"] * st["momentum_buffer"] + d, st["momentum_buffer"])
    theta = torch.where(present, theta - h["lr"] * buf, theta)
    return theta, P, G, buf


@pytest.mark.parametrize("step", [0, 6, 7], ids=["first", "plain", "pair-forming"])
def test_pass2_update(monkeypatch, step):
    f = Fused(monkeypatch, m=3, weight_decay=0.05, update_period=4, ema_decay=(0.9, 0.8), lr=0.3)
    f.fill_history([4, 0])
    f.params[0].grad = None
    assert f.plan.prepare(f.group)
    _random_state(f, step)
    present = f.present_mask()
    theta, P, G, buf = _expected_pass2(f, step, present)
    a = f.arena
    snap_p, snap_g = a.flat_state["param_snapshot"].clone(), a.flat_state["grad_snapshot"].clone()
    if step + 1 == 8:  # t = 8 = 2T: pass 1 leaves the candidate pair's sums for the damping
        f.ap.gradient_dots(f.group, None)
        sums = f.block_sums(f.ap.pair_partials)
        r = f.group["pair_momentum"]
        m = f.m
        for b in range(f.B):
            sl = f.block(b)
            S, Y = f.ring(a.history_s, b), f.ring(a.history_y, b)
            pc = int(a.counters["pair_count"][b])
            newest = (pc - 1) % m
            r_eff = r if pc > 0 else 0.0
            s = torch.lerp(P[sl] - snap_p[sl].double(), S[newest], r_eff)
            y = torch.lerp(G[sl] - snap_g[sl].double(), Y[newest], r_eff)
            torch.testing.assert_close(sums[b], torch.stack([s @ s, s @ y, y @ y]), rtol=1e-4, atol=1e-4)
    _direction_scale(f)
    f.ap.update(f.group, _ok(), None)

    flat_theta = torch.cat([p.detach().reshape(-1) for p in f.params]).double()
    for got, want in [
        (flat_theta, theta), (a.flat_state["param_ema"], P),
        (a.flat_state["grad_ema"], G), (a.flat_state["momentum_buffer"], buf),
    ]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.flat_state["param_snapshot"], snap_p)  # the push rolls them, not pass 2
    assert torch.equal(a.flat_state["grad_snapshot"], snap_g)


def test_pass2_skips_every_write_unless_ok(monkeypatch):
    f = Fused(monkeypatch, m=2)
    f.fill_history([3, 1])
    _random_state(f, step=7)  # t = 8 would form a pair
    before = [t.clone() for t in (*f.arena.flat_state.values(), *f.params)]
    f.ap.update(f.group, _ok(False), None)
    after = (*f.arena.flat_state.values(), *f.params)
    for x, y in zip(before, after):
        assert torch.equal(x, y)


# -- the pair push ----------------------------------------------------------------------
def _push_setup(f, step, pair_counts, zero_s_block=None):
    """EMAs and snapshots, and the pass-1 sums the coefficient kernel decides the pair
    from (put in each block's first worker row; the other rows zero)."""
    a, m = f.arena, f.m
    f.fill_history(pair_counts)
    _random_state(f, step)
    if zero_s_block is not None:  # s = 0 and y = 0: curvature 0, the pair is skipped
        sl = f.block(zero_s_block)
        a.flat_state["param_snapshot"][sl] = a.flat_state["param_ema"][sl]
        a.flat_state["grad_snapshot"][sl] = a.flat_state["grad_ema"][sl]
        a.history_view(a.history_s, zero_s_block).zero_()
        a.history_view(a.history_y, zero_s_block).zero_()
        f.recompute_gram()
    f.ap.pair_partials.zero_()
    r = f.group["pair_momentum"]
    candidates = []
    for b in range(f.B):
        sl = f.block(b)
        S, Y = f.ring(a.history_s, b), f.ring(a.history_y, b)
        pc = pair_counts[b]
        r_eff = r if pc > 0 else 0.0
        P, P0 = a.flat_state["param_ema"][sl].double(), a.flat_state["param_snapshot"][sl].double()
        G, G0 = a.flat_state["grad_ema"][sl].double(), a.flat_state["grad_snapshot"][sl].double()
        s = torch.lerp(P - P0, S[(pc - 1) % m], r_eff)
        y = torch.lerp(G - G0, Y[(pc - 1) % m], r_eff)
        row = int(f.ap.blocks[b, 2])
        f.ap.pair_partials[row] = torch.stack([s @ s, s @ y, y @ y])
        candidates.append((s, y))
    return candidates


def _run_push(f, ok=True):
    a = f.arena
    before = {k: v.clone() for k, v in a.counters.items()}
    snaps = (a.flat_state["param_ema"].clone(), a.flat_state["grad_ema"].clone())
    f.ap.two_loop(f.group)  # decides (phi, accepted) per block
    f.ap.push(f.group, _ok(ok), None)
    f.ap.commit(f.group, _ok(ok))
    return before, snaps


@pytest.mark.parametrize("m,pair_counts", [(3, [2, 4]), (1, [0, 1]), (2, [5, 0])])
@pytest.mark.parametrize("history_dtype", [None, torch.bfloat16], ids=["f32", "bf16"])
def test_push_writes_pair_gram_and_counters(monkeypatch, m, pair_counts, history_dtype):
    f = Fused(monkeypatch, m=m, history_dtype=history_dtype, update_period=4,
              damping=0.2, sigma_low=0.5, sigma_high=1.2)
    candidates = _push_setup(f, step=11, pair_counts=pair_counts, zero_s_block=1)  # t = 12
    a, h = f.arena, f.group
    old_rings = [(f.ring(a.history_s, b).clone(), f.ring(a.history_y, b).clone()) for b in range(f.B)]
    before, snaps = _run_push(f)

    assert a.counters["step"].tolist() == [12.0] * f.B
    assert torch.equal(a.counters["skipped_steps"], before["skipped_steps"])
    assert torch.equal(a.flat_state["param_snapshot"], snaps[0])  # rolled
    assert torch.equal(a.flat_state["grad_snapshot"], snaps[1])
    tol = dict(rtol=1e-2, atol=1e-2) if history_dtype else dict(rtol=1e-5, atol=1e-5)
    for b, (s, y) in enumerate(candidates):
        pc, slot = pair_counts[b], pair_counts[b] % m
        phi = damping_factor(s @ y, s @ s, h["sigma_low"], h["sigma_high"], h["damping"], h["eps"])
        yhat = torch.lerp(s, y, phi)
        S, Y = f.ring(a.history_s, b), f.ring(a.history_y, b)
        accepted = b == 0  # block 1 has s = 0
        assert int(a.counters["pair_count"][b]) == pc + accepted
        assert int(a.counters["skipped_pairs"][b]) == int(before["skipped_pairs"][b]) + (not accepted)
        others = [i for i in range(m) if i != slot or not accepted]
        torch.testing.assert_close(S[others], old_rings[b][0][others], rtol=0, atol=0)
        torch.testing.assert_close(Y[others], old_rings[b][1][others], rtol=0, atol=0)
        if accepted:
            torch.testing.assert_close(S[slot], s, **tol)
            torch.testing.assert_close(Y[slot], yhat, **tol)
            # The Gram matrices are those of the ring as stored, narrow or not.
            gram = torch.stack([S @ S.T, S @ Y.T, Y @ Y.T])
            scale = gram.abs().max()
            torch.testing.assert_close(a.gram[b] / scale, gram / scale, rtol=1e-6, atol=1e-6)
        else:
            S0, Y0 = old_rings[b]
            torch.testing.assert_close(a.gram[b], torch.stack([S0 @ S0.T, S0 @ Y0.T, Y0 @ Y0.T]))


@pytest.mark.parametrize(
    "step,finite,expect",
    [(9, True, "nothing due"), (3, True, "first snapshot"), (11, False, "non-finite")],
)
def test_push_when_no_pair_forms(monkeypatch, step, finite, expect):
    f = Fused(monkeypatch, m=2, update_period=4)
    _push_setup(f, step=step, pair_counts=[3, 1])
    a = f.arena
    rings = (a.history_s.clone(), a.history_y.clone(), a.gram.clone())
    snaps_before = (a.flat_state["param_snapshot"].clone(), a.flat_state["grad_snapshot"].clone())
    before, emas = _run_push(f, ok=finite)
    assert torch.equal(a.history_s, rings[0]) and torch.equal(a.history_y, rings[1])
    assert torch.equal(a.gram, rings[2])
    assert torch.equal(a.counters["pair_count"], before["pair_count"])
    assert torch.equal(a.counters["skipped_pairs"], before["skipped_pairs"])
    new_step = step + 1 if finite else step
    assert a.counters["step"].tolist() == [float(new_step)] * f.B
    assert a.counters["skipped_steps"].tolist() == [int(not finite)] * f.B
    rolled = expect == "first snapshot"
    expected = emas if rolled else snaps_before
    assert torch.equal(a.flat_state["param_snapshot"], expected[0])
    assert torch.equal(a.flat_state["grad_snapshot"], expected[1])


def test_plan_tables_cover_the_arena_in_bounded_workers():
    from mlbfgs_fused._state.layout import arena_layout

    layout = arena_layout([37, 0, 5, 50], 40)
    tiles, workers, blocks = _triton.plan_tables(layout, m=3, tile=16, cap=2)
    covered = []
    for start, end, param, local in tiles:
        p_lo = layout.param_offsets[param]
        assert p_lo <= start < end and end - start <= 16 and local == start - p_lo
        assert param + 1 == len(layout.param_offsets) or end <= layout.param_offsets[param + 1]
        covered += range(start, end)
    assert covered == list(range(layout.numel))
    visited = []
    for b, (lo, hi, w_lo, w_hi) in enumerate(blocks):
        assert 1 <= w_hi - w_lo <= 2
        for block, first, end, stride, origin, ring_stride in workers[w_lo:w_hi]:
            assert block == b and stride == w_hi - w_lo
            assert origin == 3 * lo - lo and ring_stride == hi - lo
            for start, stop, _, _ in tiles[first:end:stride]:
                assert lo <= start < stop <= hi
                visited += range(start, stop)
    assert sorted(visited) == list(range(layout.numel))
    assert [b[2] for b in blocks][1:] == [b[3] for b in blocks][:-1]


def test_partial_rows_per_block_bounded_at_a_hundred_million():
    """The launch plan for N = 1e8 in one block (no tensor is allocated): the number of
    workers, hence of partial rows every per-block sum adds, is the machine's bound
    (4 programs on each of an H100's 132 SMs), not a function of N."""
    from mlbfgs_fused._state.layout import arena_layout

    cap = 4 * 132
    n = 10**8
    layout = arena_layout([n // 2, n // 4, n // 4], "group")
    tiles, workers, blocks = _triton.plan_tables(layout, m=10, tile=_triton.TILE, cap=cap)
    assert len(tiles) >= n // _triton.TILE
    assert len(workers) == cap and blocks[0][3] - blocks[0][2] == cap
    layout = arena_layout([n // 2, n // 4, n // 4], "tensor")
    _, workers, blocks = _triton.plan_tables(layout, m=10, tile=_triton.TILE, cap=cap)
    assert len(workers) <= cap + len(blocks)
    assert all(hi - lo <= cap for _, _, lo, hi in blocks)
