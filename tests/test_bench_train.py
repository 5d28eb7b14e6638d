"""The training benchmark runs what it says: both MLBFGS variants where the backend
implements them, and a clear error for an unknown optimizer."""

import pytest
import torch

from bench import train


def test_variants_run_on_the_foreach_backend():
    cpu = torch.device("cpu")
    assert train.variant_runs("paper", "foreach", cpu) is None
    assert train.variant_runs("released", "foreach", cpu) is None


def test_a_backend_that_ignores_the_variant_is_caught(monkeypatch):
    real = train.MLBFGS

    def paper_only(*args, variant="paper", **kwargs):
        return real(*args, **kwargs)  # drops the variant: always the paper's step

    monkeypatch.setattr(train, "MLBFGS", paper_only)
    reason = train.variant_runs("released", "foreach", torch.device("cpu"))
    assert reason is not None and "computes the paper's step" in reason


def test_unknown_optimizer_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--optimizers", "mlbfgs,lion", "--smoke"])
    assert exit_info.value.code == 2
    assert "unknown optimizers ['lion']" in capsys.readouterr().err
