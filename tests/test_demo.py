"""The demo runs end to end (tiny budget) and writes its table and plot."""

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mlbfgs_fused import demo


def test_demo_runs_on_digits(tmp_path, capsys):
    demo.main(["--dataset", "digits", "--epochs", "2", "--train-subset", "400", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("MLBFGS", "AdamW", "SGD"):
        assert f"| {name} |" in out
    assert (tmp_path / "loss_digits_mlp.png").stat().st_size > 10_000


def test_state_bytes_counts_shared_storage_once():
    import torch

    model = torch.nn.Linear(4, 4)
    opt = demo.make_optimizer("MLBFGS", model, torch.device("cpu"))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    n = sum(q.numel() for q in model.parameters())
    # five [N] float32 buffers and two [10, N] rings, plus small per-block data
    assert 4 * n * (5 + 2 * 10) <= demo.state_bytes(opt) < 4 * n * (5 + 2 * 10) + 4096
