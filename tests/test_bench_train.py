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


def test_the_mlbfgs_rows_are_the_default_and_the_papers_rule():
    cpu = torch.device("cpu")
    params = [torch.nn.Parameter(torch.zeros(3))]
    default, _ = train.make_optimizer("mlbfgs", params, cpu)
    paper, _ = train.make_optimizer("mlbfgs-paper", params, cpu, lr=0.3)
    built = train.MLBFGS(params)
    assert default.defaults["normalize"] == built.defaults["normalize"] == "always"
    assert (paper.defaults["normalize"], paper.defaults["variant"], paper.defaults["lr"]) == (True, "paper", 0.3)
    assert train.SWEEP_OPTIMIZERS == ("mlbfgs", "mlbfgs-paper", "sgd-momentum", "adamw")


def test_every_optimizer_gets_the_same_sweep_budget():
    sizes = {name: len(grid) for name, grid in train.LR_GRIDS.items()}
    assert set(sizes) == set(train.HYPERPARAMETERS)
    assert len(set(sizes.values())) == 1, sizes
    for grid in train.LR_GRIDS.values():  # a log grid, about half a decade apart
        ratios = [b / a for a, b in zip(grid, grid[1:])]
        assert all(2.9 < r < 3.5 for r in ratios), grid


def test_the_learning_rate_is_chosen_on_validation_only():
    rows = [
        {"lr": 0.1, "final_val_acc": 0.80, "final_val_loss": 0.5, "final_test_acc": 0.99},
        {"lr": 0.3, "final_val_acc": 0.85, "final_val_loss": 0.6, "final_test_acc": 0.50},
        {"lr": 1.0, "final_val_acc": 0.85, "final_val_loss": 0.4, "final_test_acc": 0.10},
        {"lr": 3.0, "final_val_acc": float("nan"), "final_val_loss": float("nan"), "final_test_acc": 1.0},
    ]
    assert train.choose_lr(rows) == 1.0  # ties on accuracy: the lower validation loss
    assert train.choose_lr(rows[:2]) == 0.3


def test_the_validation_split_is_held_out_and_fixed():
    data = train.load_dataset("digits")
    first, (x_val, y_val) = train.split_validation(data, 100)
    again, (x_val2, _) = train.split_validation(data, 100, train_size=50)
    assert len(y_val) == 100 and len(first.y_train) == len(data.y_train) - 100 and len(again.y_train) == 50
    assert torch.equal(x_val, x_val2)
    rows = {tuple(r.flatten().tolist()) for r in first.x_train}
    assert not any(tuple(r.flatten().tolist()) in rows for r in x_val)  # digits has no duplicate images
    assert torch.equal(first.x_test, data.x_test)


def test_climb_after_first_pair_and_time_to_target():
    record = {"step": [10, 20, 30, 40], "train_loss": [2.0, 1.0, 3.0, 0.5], "first_loss": 2.5}
    assert train.climb_after_first_pair(record, update_period=10) == (3.0, 0.4)
    record["train_loss"][3] = float("nan")
    assert train.climb_after_first_pair(record, update_period=10)[0] == float("inf")
    run = {"eval_step": [5, 10, 15], "eval_time_s": [0.5, 1.0, 1.5], "test_acc": [0.5, 0.9, 0.95]}
    assert train.time_to_target(run, 0.9) == (10, 1.0) and train.time_to_target(run, 0.99) is None
    problem = {"runs": [{"optimizer": "a", "test_acc": [0.5, 0.90]}, {"optimizer": "a", "test_acc": [0.5, 0.92]},
                        {"optimizer": "b", "test_acc": [0.8, 0.80]}]}
    assert train.target_accuracy(problem) == pytest.approx(0.89)  # 0.98 * 0.91 = 0.8918, down to 0.5%


def test_sweep_and_stress_smoke(tmp_path):
    result = train.main(["--sweep", "--stress", "--step-times", "--smoke", "--threads", "1", "--out", str(tmp_path)])
    problem = result["problems"]["digits-mlp"]
    names = result["optimizers"]
    assert names == list(train.SWEEP_OPTIMIZERS)
    assert len(problem["sweep"]) == len(names) * len(train.LR_GRIDS["mlbfgs"])
    assert all("final_test_acc" not in row for row in problem["sweep"])  # the choice never sees the test split
    assert sorted((r["optimizer"], r["seed"]) for r in problem["runs"]) == sorted((n, s) for n in names for s in (0, 1))
    assert all(r["lr"] == problem["chosen_lr"][r["optimizer"]] for r in problem["runs"])
    stress = result["stress"]
    assert {(r["optimizer"], r["loss_scale"]) for r in stress["rows"]} == {
        (n, s) for n in ("mlbfgs", "mlbfgs-paper") for s in (1.0, 50.0)}
    assert set(result["step_times"]["problems"]["digits-mlp"]) == set(names)
    report = (tmp_path / "training_sweep.md").read_text()
    assert "| digits-mlp | mlbfgs" in report and "Stress" in report
    for name in ("training_sweep.json", "training_sweep_digits-mlp.png", "training_sweep_lr.png", "training_sweep_stress.png"):
        assert (tmp_path / name).exists()
    again = train.main(["--report-only", "--out", str(tmp_path)])
    assert again["problems"]["digits-mlp"]["chosen_lr"] == problem["chosen_lr"]
