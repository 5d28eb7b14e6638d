"""Checkpoints: the state_dict's layout and dtypes, its views of one buffer per group, a
checkpoint that does not fit refused as it loads, and one of the earlier layout loaded.
That a checkpoint resumes to the bit on every backend, and across backends, is
tests/test_parity.py's."""

import copy

import pytest
import torch

from mlbfgs_fused import MLBFGS

from problems import build_params, flat, make_optimizer, run_scenario, set_grads, standard_scenario


def test_state_dict_layout_and_dtypes():
    sc = standard_scenario("group", steps=12)
    opt, groups = run_scenario(sc, backend="foreach")
    sd = opt.state_dict()
    first = sd["state"][0]
    for key in ("momentum_buffer", "param_ema", "grad_ema", "param_snapshot", "grad_snapshot"):
        assert first[key].shape == groups[0][0].shape
    assert all(isinstance(value, torch.Tensor) for st in sd["state"].values() for value in st.values())
    assert first["gram"].dtype == torch.float64 and first["gram"].shape == (1, 3, 3, 3)
    assert first["pair_count"].dtype == torch.int64 and first["block_step"].shape == (1,)
    assert first["history_s"].shape == (3, sum(p.numel() for p in groups[0]))
    assert "history_s" not in sd["state"][1]
    # Loading keeps block dtypes even though torch casts floating state to the parameter dtype.
    opt.load_state_dict(copy.deepcopy(sd))
    (block,) = opt.block_states(groups[0][0])
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


def test_a_checkpoint_whose_block_state_is_a_list_of_dicts_resumes():
    """Checkpoints saved when each parameter's block state was a list of per-block dicts
    (``state[p]["blocks"]``; tests/data/mlbfgs_checkpoint_blocks_list.pt, written by that
    version, with a parameter in which four blocks start) load into today's layout and
    continue exactly as that version continued from them."""
    import pathlib

    saved = torch.load(pathlib.Path(__file__).parent / "data" / "mlbfgs_checkpoint_blocks_list.pt", weights_only=False)
    params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    groups = [{"params": params[:2], "blocks": 9}, {"params": params[2:], "history_dtype": torch.float32}]
    opt = MLBFGS(groups, backend="foreach", update_period=2, history_size=3, lr=0.05, normalize=True)
    opt.load_state_dict(saved["checkpoint"])
    assert opt.state[params[0]]["gram"].shape == (4, 3, 3, 3)
    assert opt.state[params[0]]["history_s"].dim() == 1  # four blocks' rings end to end
    assert len(opt.block_states(params[0])) == 4 and opt.block_states(params[2])[0]["history_s"].dtype == torch.float32
    for grads in saved["grads"]:
        for p, g in zip(params, grads):
            p.grad = g + p.detach()
        opt.step()
    for p, expected in zip(params, saved["params_after"]):
        assert torch.equal(p.detach(), expected)
