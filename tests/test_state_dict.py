"""Checkpoints: a state_dict saved mid-run resumes to a bit-identical trajectory."""

import copy

import pytest
import torch

from problems import (
    assert_bit_identical,
    build_params,
    flat,
    make_optimizer,
    resume_from_checkpoint,
    run_scenario,
    set_grads,
    standard_scenario,
)

# Points of interest with update_period 4 and history 3: before any pair,
# just after the first pair (t = 8), after the ring wrapped (4 pairs by t = 20).
SAVE_AT = [5, 9, 22]


@pytest.mark.parametrize("save_at", SAVE_AT)
@pytest.mark.parametrize("blocks", ["group", "tensor", 13])
def test_resume_is_bit_exact(save_at, blocks):
    sc = standard_scenario(blocks, steps=30)
    run1, run2 = resume_from_checkpoint(sc, save_at, "foreach", "foreach", history_dtype=torch.bfloat16)
    assert_bit_identical(run1, run2)


def test_state_dict_layout_and_dtypes():
    sc = standard_scenario("group", steps=12)
    opt, groups = run_scenario(sc, backend="foreach")
    sd = opt.state_dict()
    first = sd["state"][0]
    for key in ("momentum_buffer", "param_ema", "grad_ema", "param_snapshot", "grad_snapshot"):
        assert first[key].shape == groups[0][0].shape
    (block,) = first["blocks"]
    assert block["gram"].dtype == torch.float64
    assert block["pair_count"].dtype == torch.int64
    assert block["history_s"].shape == (3, sum(p.numel() for p in groups[0]))
    assert "blocks" not in sd["state"][1]
    # Loading keeps block dtypes even though torch casts floating state to the parameter dtype.
    opt.load_state_dict(copy.deepcopy(sd))
    (block,) = opt.state[groups[0][0]]["blocks"]
    assert block["gram"].dtype == torch.float64 and block["pair_count"].dtype == torch.int64


def test_state_is_views_of_one_buffer_per_group():
    """All per-parameter state of a group lives in one flat buffer per quantity."""
    sc = standard_scenario("tensor", steps=3)
    opt, groups = run_scenario(sc, backend="foreach")
    bufs = [opt.state[p]["momentum_buffer"] for p in groups[0]]
    base = bufs[0].untyped_storage().data_ptr()
    assert all(b.untyped_storage().data_ptr() == base for b in bufs)


def test_mismatched_checkpoint_is_rejected_before_any_write():
    sc = standard_scenario("group", steps=6)
    opt, groups = run_scenario(sc, backend="foreach")
    sd = opt.state_dict()
    # Same parameter count, different shapes: torch's own loader does not notice.
    sc_other = standard_scenario("group", steps=6)
    sc_other.shapes = [[(3, 7), (4,), (2, 3, 2)], [(11,), (3, 4)]]
    sc_other.__post_init__()
    groups2 = build_params(sc_other, torch.float32)
    opt2 = make_optimizer(sc_other, groups2, backend="foreach")
    before = [flat(g) for g in groups2]
    with pytest.raises(ValueError, match="block layout|shape"):
        opt2.load_state_dict(sd)  # refused as it loads, not at a later step
    assert not opt2.state
    set_grads(sc_other, groups2, 0)
    opt2.step()  # and the optimizer is as it was: fresh
    assert all(not torch.equal(flat(g), b) for g, b in zip(groups2, before))
