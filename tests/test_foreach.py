"""What is the foreach backend's own: the host's bound on the pair schedule (the counter
probe) and, with ``capturable``, the masked pair update that runs every step. Its
trajectories against the float64 reference are tests/test_parity.py's; its memory,
tests/test_foreach_memory.py."""

import pytest
import torch

from problems import run_scenario, standard_scenario


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_masked_pair_update_is_an_exact_identity_when_not_due(variant):
    """With ``capturable`` the host decides nothing and the masked pair update (and, in
    the released variant, the gradient gathered again) runs every step; it must leave
    the trajectory bit-identical to running it only when due, skipped steps included."""
    sc = standard_scenario("tensor", steps=30, seed=3, variant=variant)
    sc.nan_steps = (6, 7, 15)
    results = []
    for capturable in (False, True):
        _, groups = run_scenario(sc, torch.float32, backend="foreach", capturable=capturable)
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
