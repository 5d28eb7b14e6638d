"""The foreach backend against the float64 reference on random problems."""

import pytest
import torch

from problems import run_against_reference, standard_scenario

BLOCK_MODES = ["group", "tensor", 13, [[0, 2], [1]]]


def _blocks_for_group(spec, gi):
    # The list-of-lists spelling names indices of group 0; group 1 keeps one block per tensor.
    if isinstance(spec, list):
        return spec if gi == 0 else [[0], [1]]
    return spec


@pytest.mark.parametrize("blocks", BLOCK_MODES, ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_matches_reference(blocks, dtype, tol):
    sc = standard_scenario(blocks, steps=40, seed=hash(str(blocks)) % 1000)
    for gi in range(2):
        sc.hyper[gi]["blocks"] = _blocks_for_group(blocks, gi)
    opt, groups, ref, errors = run_against_reference(sc, dtype, backend="foreach")
    assert max(errors) < tol
    # The scenario must exercise what it claims to: wrapped histories, damping, skipped pairs.
    blocks_ref = [b for g in ref.groups for b in g.blocks]
    assert max(len(b.pairs) for b in blocks_ref) == 3
    assert sum(b.damped_pairs for b in blocks_ref) > 0
    # counters agree with the reference block by block
    counts = []
    for params in groups:
        for p in params:
            counts += [(int(b["pair_count"]), int(b["skipped_pairs"])) for b in opt.block_states(p)]
    ref_counts = []
    for g in ref.groups:
        for b in g.blocks:
            accepted = g.t // g.h["update_period"] - 1 - b.skipped_pairs
            ref_counts.append((accepted, b.skipped_pairs))
    assert counts == ref_counts
    assert max(c for c, _ in counts) > 3  # the ring wrapped
    if blocks == "tensor":
        assert sum(s for _, s in counts) >= 1


def test_default_hyperparameters_float64():
    """The published settings (ema_decay 0.999, pair momentum 0.9, T large) in float64."""
    sc = standard_scenario("group", steps=70, history_size=2, update_period=10,
                           ema_decay=(0.999, 0.999), pair_momentum=0.9)
    _, _, ref, errors = run_against_reference(sc, torch.float64, backend="foreach")
    assert max(errors) < 1e-10
    assert len(ref.groups[0].blocks[0].pairs) == 2


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_flags_match_reference(normalize, maximize):
    sc = standard_scenario("tensor", steps=24, normalize=normalize, maximize=maximize)
    _, _, _, errors = run_against_reference(sc, torch.float64, backend="foreach")
    assert max(errors) < 1e-10


def test_bfloat16_history_close_to_reference():
    sc = standard_scenario("group", steps=40)
    opt, groups, _, errors = run_against_reference(
        sc, torch.float32, backend="foreach", history_dtype=torch.bfloat16
    )
    assert max(errors) < 1e-2
    assert opt.block_states(groups[0][0])[0]["history_s"].dtype == torch.bfloat16


def test_non_finite_steps_shift_the_pair_schedule():
    """A skipped step does not advance the counter, so later pair updates move by one."""
    sc = standard_scenario("tensor", steps=40)
    sc.nan_steps = (5, 14, 15)
    opt, groups, ref, errors = run_against_reference(sc, torch.float64, backend="foreach")
    assert max(errors) < 1e-10
    block = opt.block_states(groups[0][0])[0]
    assert int(block["skipped_steps"]) == 3 and float(block["step"]) == 37
    assert ref.groups[0].skipped_steps == 3


def test_masked_pair_update_is_an_exact_identity_when_not_due():
    """With ``capturable`` the host decides nothing and the masked pair update runs
    every step; it must leave the trajectory bit-identical to running it only when due."""
    sc = standard_scenario("tensor", steps=30)
    sc.nan_steps = (6,)
    results = []
    for capturable in (False, True):
        opt, groups, _, _ = run_against_reference(sc, torch.float32, backend="foreach", capturable=capturable)
        results.append([p.detach().clone() for g in groups for p in g])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_counter_probe_bounds_the_pair_schedule():
    from mlbfgs_fused.backends.foreach import CounterProbe

    probe = CounterProbe(torch.device("cpu"))
    assert probe.pair_update_possible(5)  # nothing known yet
    for t, expected in [(3, False), (4, True), (5, False), (9, True), (10, False)]:
        probe.record(torch.tensor(float(t)))
        assert probe.pair_update_possible(5) is expected, t
    # Two steps whose copies are unknown (as if still in flight): the counter may
    # have reached 10 + 3 = 13 by the end of this step, so 15 is out of reach ...
    probe.record(torch.tensor(10.0))
    probe.calls += 2
    assert not probe.pair_update_possible(5)
    # ... but from 12, 15 is within reach of three more steps.
    probe.record(torch.tensor(12.0))
    probe.calls += 2
    assert probe.pair_update_possible(5)
