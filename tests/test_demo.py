"""The demo runs end to end (tiny budget), plots against steps and time, and
rejects bad input with a clear message instead of a traceback."""

import os

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from mlbfgs_fused import demo


def test_demo_runs_on_digits(tmp_path, capsys):
    demo.main(["--dataset", "digits", "--epochs", "2", "--train-subset", "400", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for name in ("MLBFGS", "AdamW", "SGD"):
        assert f"| {name} |" in out
    assert (tmp_path / "loss_digits_mlp.png").stat().st_size > 10_000


def test_plot_has_a_step_panel_and_a_time_panel_and_names_the_window(tmp_path):
    gen = torch.Generator().manual_seed(0)
    steps = 200
    results = [
        dict(optimizer=name, losses=(1 + torch.rand(steps, generator=gen)).tolist(),
             times=torch.linspace(0.01, scale, steps).tolist(), test_acc=0.5)
        for name, scale in (("MLBFGS", 3.0), ("SGD", 1.0))
    ]
    fig = demo.plot_curves(results, tmp_path / "curves.png", "title")
    by_step, by_time = fig.axes
    assert by_step.get_xlabel() == "step" and "wall-clock" in by_time.get_xlabel()
    window = demo.smoothing_window(steps)
    assert window == 4
    assert f"moving average over {window} steps" in by_step.get_ylabel()
    assert f"{window}-step window" in by_step.get_legend().get_title().get_text()
    # The time panel plots each optimizer against its own clock, window-aligned.
    mlbfgs_line = by_time.get_lines()[0]
    assert mlbfgs_line.get_xdata()[-1] == pytest.approx(3.0)
    assert len(mlbfgs_line.get_xdata()) == steps - window + 1
    assert (tmp_path / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("option", ["--epochs", "--batch-size", "--train-subset"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_counts_are_rejected(option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--dataset", "digits", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a positive integer, got {int(value)}" in err


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--dataset", "fashion-mnist", "--epochs", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "apt-get install -y dataset-fashion-mnist" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        demo.load_dataset("fashion-mnist")


def test_fashion_mnist_folder_can_be_named_by_the_environment(tmp_path):
    """A copy of the idx files carried to a machine without Debian's package."""
    import gzip
    import subprocess
    import sys

    for split, count in (("train", 3), ("t10k", 2)):
        images = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
        labels = bytes([0, 0, 8, 1]) + count.to_bytes(4, "big")
        (tmp_path / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(images + bytes(range(count)) * 784))
        (tmp_path / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels + bytes(range(count))))
    script = "from mlbfgs_fused import demo; d = demo.load_dataset('auto'); print(d.name, tuple(d.x_train.shape))"
    env = {**os.environ, "MLBFGS_FASHION_MNIST_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "fashion-mnist (3, 1, 28, 28)"


def test_state_bytes_counts_shared_storage_once():
    model = torch.nn.Linear(4, 4)
    opt = demo.make_optimizer("MLBFGS", model, torch.device("cpu"))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    n = sum(q.numel() for q in model.parameters())
    # five [N] float32 buffers and two [10, N] rings, plus small per-block data
    assert 4 * n * (5 + 2 * 10) <= demo.state_bytes(opt) < 4 * n * (5 + 2 * 10) + 4096
