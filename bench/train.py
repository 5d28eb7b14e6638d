"""Training runs: MLBFGS (the library's default step length, the paper's rule, the
authors' released variant) against SGD with momentum and AdamW.

``python -m bench.train`` trains a small CNN and an MLP on Fashion-MNIST when its
idx files are present (``apt-get install -y dataset-fashion-mnist``, Debian's
package, puts them under /usr/share/datasets/fashion-mnist/), else on
scikit-learn's bundled digits. Every optimizer gets the same runs: the same seeds
(model initialisation and batch order), data, epochs and learning-rate schedule.
It writes ``training.json`` (loss and test accuracy against steps and wall-clock,
per seed) into the machine's results folder; ``bench.report`` plots it. MLBFGS
runs on the fastest backend that works on the device (Triton, else CUDA C++, on a
GPU; the C++ kernels, else foreach, on the CPU).

``python -m bench.train --sweep`` is the comparison that decides MLBFGS's default
(docs/design.md, "Step length"): per problem (Fashion-MNIST MLP and CNN, the digits
MLP), every optimizer gets the same learning-rate sweep (``LR_GRIDS``: five values on a
log grid each), each run scored on a validation split held out of the training set;
the best learning rate by validation accuracy is then run with every seed and
reported on the test split (accuracy and loss against steps and wall-clock,
time-to-target accuracy). ``--stress`` adds the loss-scale stress case of the digits
MLP (batch 64, ``update_period=10``, loss x 50): how many seeds' running-mean loss
climbs after the first curvature pair. ``--step-times`` times each optimizer's step in
turns in one process (a shared machine's load then falls on all alike). Each part can
run as its own command; all write into ``training_sweep.json``, then
``training_sweep.md`` and ``training_sweep_*.png``, which ``--report-only`` rebuilds
from the JSON.

Optimizers (``--optimizers``): ``mlbfgs`` (the library's default,
``normalize="always"``: ``lr`` is the step length from the first step on),
``mlbfgs-paper`` (``normalize=True``, ``variant="paper"``: the paper's math, SGD steps
of ``lr * g`` until the first pair), ``mlbfgs-released`` (``variant="released"``,
docs/design.md, "The released variant"), ``sgd-momentum``, ``adamw``, and on request
``authors-style`` (the re-implementation of the authors' step in ``bench/baselines/``:
the released math, their implementation's speed). An MLBFGS variant that the chosen
backend does not implement is left out, with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from mlbfgs_fused import MLBFGS, backends
from mlbfgs_fused.demo import (
    FASHION_MNIST_HINT, Dataset, evaluate, fashion_mnist_present, mlp, positive_int, small_cnn,
)
from mlbfgs_fused.demo import load_dataset as demo_load_dataset

from .baselines import AuthorsStyleMLBFGS
from .contenders import mlbfgs_backend_works
from .machine import default_device, machine_stamp, results_dir
from .timing import load_average

# The authors' published mL-BFGS settings; the first-order baselines get the usual ones.
MLBFGS_HYPER = dict(
    lr=0.1, momentum=0.9, weight_decay=5e-4, history_size=10, update_period=50,
    ema_decay=(0.999, 0.999), pair_momentum=0.9, damping=0.01,
)
HYPERPARAMETERS = {
    "mlbfgs": {**MLBFGS_HYPER, "variant": "paper", "normalize": "always"},  # the library's default
    "mlbfgs-paper": {**MLBFGS_HYPER, "variant": "paper", "normalize": True},
    "mlbfgs-released": {**MLBFGS_HYPER, "variant": "released", "normalize": True},
    "sgd-momentum": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=5e-4),
    "authors-style": MLBFGS_HYPER,
}
EVAL_SUBSET = 5000  # test images behind the curves (the final accuracy uses them all)
SCHEDULE = "cosine annealing to 0 over all steps, stepped every mini-batch"
OPTIMIZERS = ("mlbfgs", "mlbfgs-paper", "sgd-momentum", "adamw")  # the default set
MLBFGS_NAMES = ("mlbfgs", "mlbfgs-paper", "mlbfgs-released")


# -- data and models: the demo's, so the two tell the same story -------------------
MODELS = {"mlp": mlp, "cnn": small_cnn}


def load_dataset(prefer: str = "fashion-mnist") -> Dataset:
    if prefer == "fashion-mnist" and not fashion_mnist_present():
        print(FASHION_MNIST_HINT)
        prefer = "digits"
    return demo_load_dataset(prefer)


# MLBFGS backends to try per device type, fastest first; foreach runs everywhere.
BACKEND_PREFERENCE = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}


def mlbfgs_backend(device: torch.device) -> str:
    """The first registered backend that runs on ``device`` (found by trying), else foreach."""
    for name in BACKEND_PREFERENCE.get(device.type, ()):
        if name in backends.names() and mlbfgs_backend_works(name, device):
            return name
    return "foreach"


def variant_runs(variant: str, backend: str, device: torch.device) -> str | None:
    """None if ``MLBFGS(variant=variant)`` runs on ``backend``, else why not.

    Chosen by trying, on a tiny quadratic: the released variant must also give
    another trajectory than the paper's (its sums move the first pair, and it uses
    a pair at the step that forms it), so a backend that accepts the option but
    computes the paper's math is caught."""

    def trajectory(v: str) -> Tensor:
        gen = torch.Generator().manual_seed(0)
        target = torch.randn(64, generator=gen).to(device)
        p = nn.Parameter(torch.randn(64, generator=gen).to(device))
        opt = MLBFGS([p], backend=backend, variant=v, update_period=2, history_size=2, lr=0.05)
        for _ in range(6):  # pairs form at steps 4 and 6
            p.grad = (1 + torch.arange(64, device=device) / 64) * (p.detach() - target)
            opt.step()
        return p.detach().clone()

    try:
        mine = trajectory(variant)
        if variant != "paper" and torch.equal(mine, trajectory("paper")):
            return f"the {backend} backend takes variant={variant!r} but computes the paper's step"
    except (NotImplementedError, ValueError, RuntimeError) as exc:
        return f"the {backend} backend cannot run variant={variant!r}: {exc}"
    return None


def make_optimizer(name: str, params, device: torch.device, **overrides):
    """Optimizer ``name`` with its ``HYPERPARAMETERS``, ``overrides`` (e.g. ``lr``) on top."""
    hyper = {**HYPERPARAMETERS[name], **overrides}
    if name in MLBFGS_NAMES:
        backend = mlbfgs_backend(device)
        return MLBFGS(params, backend=backend, **hyper), backend
    if name == "authors-style":
        return AuthorsStyleMLBFGS(params, **hyper), None
    if name == "sgd-momentum":
        return torch.optim.SGD(params, **hyper), None
    if name == "adamw":
        return torch.optim.AdamW(params, **hyper), None
    raise ValueError(name)


# -- one run ----------------------------------------------------------------------
RECORD_EVERY = 10  # steps per point of the training-loss curve (the running mean over them)


def train_one(model_kind, opt_name, seed, data: Dataset, epochs, batch_size, device, evals_per_epoch=2, *,
              overrides=None, evals=None, eval_subset=EVAL_SUBSET, validation=None, loss_scale=1.0,
              schedule="cosine", stop_when_diverged=False):
    """One training run; its curves and final numbers as a dict.

    ``overrides``: hyperparameters over ``HYPERPARAMETERS[opt_name]`` (``lr`` in the
    sweep). ``evals``: points of the test curve over the whole run (default
    ``evals_per_epoch`` a epoch), each on the first ``eval_subset`` test images.
    ``validation``: ``(x, y)`` scored once at the end (``final_val_acc``, ``final_val_loss``).
    ``loss_scale`` multiplies the loss that is differentiated (the curves record the
    unscaled loss). ``schedule``: ``"cosine"`` (to 0 over all steps, stepped every
    mini-batch) or ``"constant"``. ``stop_when_diverged``: end the run at the first
    non-finite loss (``diverged`` records it)."""
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    torch.manual_seed(seed)
    model = MODELS[model_kind](data).to(device)
    opt, backend = make_optimizer(opt_name, list(model.parameters()), device, **(overrides or {}))
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sched_opt = opt.sgd if isinstance(opt, AuthorsStyleMLBFGS) else opt
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sched_opt, T_max=total)
    elif schedule == "constant":
        scheduler = None
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    eval_every = max(1, total // evals if evals else steps_per_epoch // evals_per_epoch)
    x_eval, y_eval = x_test[:eval_subset], y_test[:eval_subset]
    gen = torch.Generator().manual_seed(seed)
    record = {"step": [], "time_s": [], "train_loss": [], "eval_step": [], "eval_time_s": [], "test_loss": [], "test_acc": []}
    wall, step, running, count, step_times, diverged = 0.0, 0, 0.0, 0, [], False
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen).to(device)
        for i in range(0, len(x_train), batch_size):
            idx = order[i : i + batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            loss_value = loss.item()  # also waits for the device
            step_times.append(time.perf_counter() - t0)
            wall += step_times[-1]
            step += 1
            running, count = running + loss_value, count + 1
            if step == 1:
                record["first_loss"] = loss_value
            if step % RECORD_EVERY == 0 or step == total:
                record["step"].append(step)
                record["time_s"].append(wall)
                record["train_loss"].append(running / count)
                running, count = 0.0, 0
            if (step % eval_every == 0 and total - step >= eval_every // 2) or step == total:
                test_loss, test_acc = evaluate(model, x_eval, y_eval)  # a fixed subset: the curves
                for key, value in zip(("eval_step", "eval_time_s", "test_loss", "test_acc"), (step, wall, test_loss, test_acc)):
                    record[key].append(value)
            if stop_when_diverged and not math.isfinite(loss_value):
                diverged = True
                break
        if diverged:
            break
    test_loss, test_acc = evaluate(model, x_test, y_test)  # the whole test set: the final numbers
    record.update(final_test_acc=test_acc, final_test_loss=test_loss, train_time_s=wall, backend=backend,
                  median_step_ms=1e3 * statistics.median(step_times), load_average=load_average(),
                  params=sum(p.numel() for p in model.parameters()), steps=step)
    if validation is not None:
        val_loss, val_acc = evaluate(model, validation[0].to(device), validation[1].to(device))
        record.update(final_val_acc=val_acc, final_val_loss=val_loss)
    if stop_when_diverged:
        record["diverged"] = diverged
    return record


def run_training(device, dataset="fashion-mnist", models=("cnn", "mlp"), optimizers=OPTIMIZERS,
                 seeds=(0, 1, 2), epochs=None, batch_size=128, train_subset=None, verbose=True):
    data = load_dataset(dataset)
    if train_subset:
        data.x_train, data.y_train = data.x_train[:train_subset], data.y_train[:train_subset]
    if epochs is None:
        # Stated in RESULTS.md: fewer epochs on a CPU (a 15-minute budget for all of bench.run).
        epochs = {"cnn": 2, "mlp": 3} if device.type == "cpu" else {"cnn": 10, "mlp": 10}
    elif isinstance(epochs, int):
        epochs = {m: epochs for m in models}
    optimizers, left_out = _runnable(optimizers, device)
    runs = []
    for model_kind in models:
        # Seed-major: a slow spell of a shared machine falls on every optimizer, not on one.
        for seed in seeds:
            for opt_name in optimizers:
                rec = train_one(model_kind, opt_name, seed, data, epochs[model_kind], batch_size, device)
                rec.update(model=model_kind, optimizer=opt_name, seed=seed, epochs=epochs[model_kind])
                runs.append(rec)
                if verbose:
                    print(f"  {model_kind:4s} {opt_name:14s} seed {seed}: test acc {rec['final_test_acc']:.4f}, "
                          f"train {rec['train_time_s']:.1f} s, median step {rec['median_step_ms']:.2f} ms", flush=True)
    return {
        "dataset": data.name,
        "eval_subset": min(EVAL_SUBSET, len(data.y_test)),
        "train_size": len(data.y_train),
        "test_size": len(data.y_test),
        "batch_size": batch_size,
        "epochs": epochs,
        "seeds": list(seeds),
        "hyperparameters": {name: HYPERPARAMETERS[name] for name in optimizers},
        "schedule": SCHEDULE,
        "left_out": left_out,
        "runs": runs,
    }


# -- the learning-rate sweep (docs/design.md, "Step length") -----------------------
SWEEP_OPTIMIZERS = ("mlbfgs", "mlbfgs-paper", "sgd-momentum", "adamw")
# The same budget for every optimizer: five learning rates about half a decade apart,
# centred on the best value of a short pilot on the three problems (the Fashion-MNIST
# MLP for 3 epochs, the CNN for one epoch of 20k images, the digits MLP) over seven.
# MLBFGS's lr is a step length over the group (with the paper's rule also the warm-up's
# SGD rate): the same grid under both rules.
LR_GRIDS = {
    "mlbfgs": (0.01, 0.03, 0.1, 0.3, 1.0),
    "mlbfgs-paper": (0.01, 0.03, 0.1, 0.3, 1.0),
    "mlbfgs-released": (0.01, 0.03, 0.1, 0.3, 1.0),
    "authors-style": (0.01, 0.03, 0.1, 0.3, 1.0),
    "sgd-momentum": (0.003, 0.01, 0.03, 0.1, 0.3),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}
VALIDATION_SEED = 12345  # the held-out split is the same for every run and seed
TARGET_FRACTION = 0.98  # time-to-target: 98% of the best optimizer's final accuracy


@dataclass(frozen=True)
class Problem:
    """One sweep problem: data, model, batch, length and what is scored."""

    dataset: str
    model: str
    batch_size: int
    epochs: int
    val_size: int  # held out of the training split: the learning rate is chosen on it
    train_size: int | None = None  # the first K of the rest (None: all of it)
    evals: int = 16  # points of the test curve over a run
    eval_subset: int = 10_000  # test images behind the curves (the final accuracy uses them all)


# Sized for a 2-core CPU (one thread, one process, about an hour for the whole sweep):
# the MLP and the CNN see all 55k training images (5k held out), 8 and 3 epochs.
PROBLEMS = {
    "fmnist-mlp": Problem("fashion-mnist", "mlp", batch_size=128, epochs=8, val_size=5000),
    "fmnist-cnn": Problem("fashion-mnist", "cnn", batch_size=128, epochs=3, val_size=5000, eval_subset=2000),
    "digits-mlp": Problem("digits", "mlp", batch_size=64, epochs=40, val_size=287),
}
SMOKE_PROBLEM = Problem("digits", "mlp", batch_size=64, epochs=1, val_size=100, train_size=256, evals=2)


def split_validation(data: Dataset, val_size: int,
                     train_size: int | None = None) -> tuple[Dataset, tuple[Tensor, Tensor]]:
    """``data`` with ``val_size`` training examples held out (a fixed draw), and those."""
    perm = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(VALIDATION_SEED))
    val, rest = perm[:val_size], perm[val_size:]
    if train_size:
        rest = rest[:train_size]
    rest = rest.sort().values  # the training order stays the dataset's; each run shuffles it
    train = Dataset(data.name, data.x_train[rest], data.y_train[rest], data.x_test, data.y_test)
    return train, (data.x_train[val], data.y_train[val])


def choose_lr(rows: list[dict]) -> float:
    """The learning rate of the best row by validation accuracy (ties: lower validation
    loss; non-finite values rank last). The test split is never looked at."""

    def key(row):
        acc, loss = row["final_val_acc"], row["final_val_loss"]
        acc = acc if math.isfinite(acc) else -1.0
        loss = loss if math.isfinite(loss) else math.inf
        return (-acc, loss, row["lr"])

    return min(rows, key=key)["lr"]


def _runnable(optimizers, device) -> tuple[list[str], dict]:
    """The optimizers whose MLBFGS variant the chosen backend computes, and why the rest are left out."""
    backend, left_out = mlbfgs_backend(device), {}
    for name in optimizers:
        variant = HYPERPARAMETERS[name].get("variant")
        reason = variant and variant_runs(variant, backend, device)
        if reason:
            left_out[name] = reason
            print(f"  {name} left out: {reason}", flush=True)
    return [name for name in optimizers if name not in left_out], left_out


def _curves(record: dict) -> dict:
    keys = ("step", "time_s", "train_loss", "eval_step", "eval_time_s", "test_loss", "test_acc")
    return {k: record[k] for k in keys}


def run_sweep(device, problems=tuple(PROBLEMS), optimizers=SWEEP_OPTIMIZERS, seeds=(0, 1, 2),
              problem_specs=None, verbose=True) -> dict:
    """Per problem: every optimizer's grid at ``seeds[0]``, scored on the validation
    split; then every seed at each optimizer's chosen learning rate, scored on the test
    split (the ``seeds[0]`` run at that rate is the sweep's own run: training is
    deterministic and a run scores both splits)."""
    specs = problem_specs or PROBLEMS
    optimizers, left_out = _runnable(optimizers, device)
    grid_sizes = {len(LR_GRIDS[name]) for name in optimizers}
    if len(grid_sizes) != 1:
        raise ValueError(f"every optimizer needs the same sweep budget: grid sizes {sorted(grid_sizes)}")
    (n_lrs,) = grid_sizes
    out = {}
    for problem in problems:
        spec = specs[problem]
        data, validation = split_validation(load_dataset(spec.dataset), spec.val_size, spec.train_size)
        if data.name != spec.dataset:
            raise SystemExit(f"{problem} needs {spec.dataset}: {FASHION_MNIST_HINT}")
        kwargs = dict(evals=spec.evals, eval_subset=spec.eval_subset, validation=validation, stop_when_diverged=True)

        def run(name, seed, lr):
            rec = train_one(spec.model, name, seed, data, spec.epochs, spec.batch_size, device,
                            overrides={"lr": lr}, **kwargs)
            rec.update(optimizer=name, seed=seed, lr=lr)
            if verbose:
                print(f"  {problem} {name:14s} lr {lr:<7g} seed {seed}: val acc {rec['final_val_acc']:.4f}"
                      f"{' (diverged)' if rec['diverged'] else ''}, train {rec['train_time_s']:.1f} s", flush=True)
            return rec

        sweep, first = [], {}
        for i in range(n_lrs):
            for name in optimizers:  # one learning rate of every optimizer in turn: a slow spell falls on all
                rec = run(name, seeds[0], LR_GRIDS[name][i])
                first[(name, rec["lr"])] = rec
                sweep.append({k: rec[k] for k in ("optimizer", "lr", "final_val_acc", "final_val_loss", "diverged",
                                                  "steps", "train_time_s", "median_step_ms")})
        chosen = {name: choose_lr([r for r in sweep if r["optimizer"] == name]) for name in optimizers}
        runs = [first[(name, chosen[name])] for name in optimizers]
        for seed in seeds[1:]:
            for name in optimizers:
                runs.append(run(name, seed, chosen[name]))
        for rec in runs:
            rec.update(_curves(rec))
        out[problem] = {
            **asdict(spec), "train_size": len(data.y_train), "test_size": len(data.y_test),
            "eval_subset": min(spec.eval_subset, len(data.y_test)),
            "steps": runs[0]["steps"] if not runs[0]["diverged"] else None,
            "sweep": sweep, "chosen_lr": chosen, "runs": runs,
        }
    return {
        "problems": out,
        "optimizers": list(optimizers),
        "left_out": left_out,
        "lr_grids": {name: list(LR_GRIDS[name]) for name in optimizers},
        "hyperparameters": {name: HYPERPARAMETERS[name] for name in optimizers},
        "seeds": list(seeds),
        "schedule": SCHEDULE,
        "selection": "the learning rate with the best final validation accuracy at seed "
                     f"{seeds[0]} (ties: lower validation loss); validation split: a fixed draw "
                     f"(seed {VALIDATION_SEED}) held out of the training split",
        "target_fraction": TARGET_FRACTION,
    }


# -- the stress case: a loss scale the warm-up does not expect ---------------------
STRESS = dict(problem="digits-mlp", batch_size=64, update_period=10, loss_scales=(1.0, 50.0), lr=0.1,
              epochs=15, seeds=20, optimizers=("mlbfgs", "mlbfgs-paper"), schedule="constant")


def climb_after_first_pair(record: dict, update_period: int) -> tuple[float, float]:
    """(highest running-mean loss after the first pair over the running mean at the
    step that forms it (``2 T``), that running mean over the first step's loss): inf
    where the loss went non-finite."""
    steps, loss = record["step"], record["train_loss"]
    at = max((i for i, s in enumerate(steps) if s <= 2 * update_period), default=0)
    warmup = loss[at] / record["first_loss"] if all(math.isfinite(v) for v in loss[: at + 1]) else math.inf
    if record.get("diverged") or not all(math.isfinite(v) for v in loss):
        return math.inf, warmup
    after = loss[at + 1 :]
    return (max(after) / loss[at] if after else 1.0), warmup


def run_stress(device, seeds=None, epochs=None, optimizers=None, verbose=True) -> dict:
    """The digits MLP with batch 64, ``update_period=10``, the constructor's default
    ``lr = 0.1`` held constant, the loss as it is and x 50, for the default step length
    and the paper's rule: how each seed's running-mean loss moves after the first pair."""
    cfg = dict(STRESS)
    seeds = range(cfg["seeds"]) if seeds is None else seeds
    epochs = cfg["epochs"] if epochs is None else epochs
    optimizers, _ = _runnable(optimizers or cfg["optimizers"], device)
    data = load_dataset("digits")
    rows = []
    for scale in cfg["loss_scales"]:
        for seed in seeds:
            for name in optimizers:
                rec = train_one("mlp", name, seed, data, epochs, cfg["batch_size"], device, evals=1,
                                overrides={"lr": cfg["lr"], "update_period": cfg["update_period"]},
                                loss_scale=scale, schedule=cfg["schedule"], stop_when_diverged=True)
                climb, warmup = climb_after_first_pair(rec, cfg["update_period"])
                rows.append({"optimizer": name, "loss_scale": scale, "seed": seed, "climb": climb,
                             "warmup_ratio": warmup, "first_loss": rec["first_loss"], "diverged": rec["diverged"],
                             "final_test_acc": rec["final_test_acc"],
                             "step": rec["step"], "train_loss": rec["train_loss"]})
                if verbose:
                    print(f"  stress x{scale:g} {name:13s} seed {seed}: climb after the first pair {climb:.3g}x"
                          f"{' (diverged)' if rec['diverged'] else ''}", flush=True)
    return {**{k: v for k, v in cfg.items() if k not in ("seeds", "epochs", "optimizers")},
            "seeds": list(seeds), "epochs": epochs, "optimizers": list(optimizers),
            "record_every": RECORD_EVERY, "rows": rows}


# -- the cost of a step, measured round-robin ---------------------------------------
def measure_step_times(device, problems: dict, optimizers, rounds: int = 6, block: int = 50, specs=None) -> dict:
    """Seconds per training step (forward, backward, step) of each optimizer at its chosen
    learning rate, timed in blocks of ``block`` steps taken in turn, the order rotated
    every round, so that a busy spell of a shared machine falls on every optimizer alike;
    the median over ``rounds`` block means (a block of 50 holds one MLBFGS pair step at
    ``update_period=50``), after one untimed block each."""
    out = {}
    for pname, problem in problems.items():
        spec = (specs or PROBLEMS)[pname]
        data, _ = split_validation(load_dataset(spec.dataset), spec.val_size, spec.train_size)
        x_train, y_train = data.x_train.to(device), data.y_train.to(device)
        runs = {}
        for name in optimizers:
            torch.manual_seed(0)
            model = MODELS[spec.model](data).to(device)
            opt, _ = make_optimizer(name, list(model.parameters()), device, lr=problem["chosen_lr"][name])
            runs[name] = (model, opt, torch.Generator().manual_seed(0))
        means = {name: [] for name in optimizers}
        for r in range(rounds + 1):
            order = list(optimizers[r % len(optimizers):]) + list(optimizers[: r % len(optimizers)])
            for name in order:
                model, opt, gen = runs[name]
                batches = [torch.randint(len(y_train), (spec.batch_size,), generator=gen).to(device)
                           for _ in range(block)]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for idx in batches:
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                    loss.backward()
                    opt.step()
                loss.item()
                if r:
                    means[name].append((time.perf_counter() - t0) / block)
        out[pname] = {name: {"step_ms": 1e3 * statistics.median(v), "block_ms": [1e3 * t for t in v]}
                      for name, v in means.items()}
    return {"rounds": rounds, "block": block, "load_average": load_average(), "problems": out}


# -- the sweep's report -------------------------------------------------------------
def target_accuracy(problem: dict, fraction: float = TARGET_FRACTION) -> float:
    """``fraction`` of the best optimizer's mean final accuracy on the curves' test
    images, rounded down to 0.5%: a level the better optimizers reach well before the
    end, so that the time to reach it measures speed apart from the final accuracy."""
    finals = {}
    for rec in problem["runs"]:
        if rec["test_acc"]:
            finals.setdefault(rec["optimizer"], []).append(rec["test_acc"][-1])
    best = max(statistics.mean(v) for v in finals.values())
    return math.floor(fraction * best * 200) / 200


def time_to_target(record: dict, target: float) -> tuple[int, float] | None:
    """(step, training seconds) of the first test point at or above ``target``, else None."""
    for step, seconds, acc in zip(record["eval_step"], record["eval_time_s"], record["test_acc"]):
        if acc >= target:
            return step, seconds
    return None


def _mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sweep_tables(result: dict) -> str:
    problems, lines = result["problems"], []
    step_times = result.get("step_times", {}).get("problems", {})
    lines += ["| problem | optimizer | lr (chosen) | test acc % (mean ± std) | min - max | test loss | "
              "steps to target | reached | seconds to target, in the runs | median step ms, in the runs | "
              "step ms, round-robin | steps to target x round-robin step, s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for pname, problem in problems.items():
        target = target_accuracy(problem)
        for name in result["optimizers"]:
            mine = [r for r in problem["runs"] if r["optimizer"] == name]
            acc_m, acc_s = _mean_std(100 * r["final_test_acc"] for r in mine)
            loss_m, _ = _mean_std(r["final_test_loss"] for r in mine)
            hits = [t for t in (time_to_target(r, target) for r in mine) if t]
            steps = f"{statistics.mean(h[0] for h in hits):.0f}" if hits else "-"
            secs = f"{statistics.mean(h[1] for h in hits):.1f}" if hits else "-"
            backend = f" ({mine[0]['backend']})" if mine[0].get("backend") else ""
            rr = step_times.get(pname, {}).get(name, {}).get("step_ms")
            estimate = f"{statistics.mean(h[0] for h in hits) * rr / 1e3:.1f}" if rr and hits else "-"
            lines.append(
                f"| {pname} | {name}{backend} | {problem['chosen_lr'][name]:g} | {acc_m:.2f} ± {acc_s:.2f} | "
                f"{100 * min(r['final_test_acc'] for r in mine):.2f} - "
                f"{100 * max(r['final_test_acc'] for r in mine):.2f} | "
                f"{loss_m:.4f} | {steps} | {len(hits)}/{len(mine)} | {secs} | "
                f"{statistics.median(r['median_step_ms'] for r in mine):.2f} | "
                f"{f'{rr:.2f}' if rr else '-'} | {estimate} |")
    lines += ["", "Targets (test accuracy on the curves' test images, "
              f"{100 * result['target_fraction']:.0f}% of the best optimizer's mean final value, rounded down "
              "to 0.5%): "
              + ", ".join(f"{p} {100 * target_accuracy(pr):.1f}% ({pr['eval_subset']} images)"
                          for p, pr in problems.items())
              + ". Steps and seconds to target: the mean over the seeds that reach it, at the test points "
              "(every 1/16 of a run), so a resolution of 1/16 of the run. Seconds in the runs: the training "
              "wall-clock of each run, taken as the machine's load came; round-robin: the median step of each "
              "optimizer timed in turns of 50 steps in one process (`measure_step_times`"
              + (f", 1-minute load average {result['step_times']['load_average']:.1f} at its end"
                 if result.get("step_times", {}).get("load_average") is not None else "")
              + "), the fairer comparison of the cost of a step on a shared machine (its absolute values carry "
              "that moment's load).", ""]
    lines += ["Learning-rate sweep: final validation accuracy % per learning rate (seed "
              f"{result['seeds'][0]}); **bold** the chosen one, `div` a run that went non-finite.", ""]
    for pname, problem in problems.items():
        n_lrs = len(next(iter(result["lr_grids"].values())))
        lines += [f"| {pname} | " + " | ".join(f"lr {i + 1}" for i in range(n_lrs)) + " |", "| --- |" + " --- |" * n_lrs]
        for name in result["optimizers"]:
            cells = []
            for row in (r for r in problem["sweep"] if r["optimizer"] == name):
                cell = f"{row['lr']:g}: " + ("div" if row["diverged"] else f"{100 * row['final_val_acc']:.2f}")
                cells.append(f"**{cell}**" if row["lr"] == problem["chosen_lr"][name] else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def stress_table(stress: dict) -> str:
    lines = [f"Digits MLP, batch {stress['batch_size']}, update_period={stress['update_period']} (first pair at step "
             f"{2 * stress['update_period']}), lr={stress['lr']:g} constant, {stress['epochs']} epochs, "
             f"{len(stress['seeds'])} seeds. Climb: the highest running mean of the loss (over {stress['record_every']} "
             f"steps) after the first pair over the running mean at the step that forms it; non-finite counts as a climb.",
             "", "| loss scale | optimizer | seeds climbing > 2x | > 4x | non-finite | median climb | largest climb | "
             "loss at the switch / first step's (median) | final test acc % (mean) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for scale in stress["loss_scales"]:
        for name in stress["optimizers"]:
            mine = [r for r in stress["rows"] if r["optimizer"] == name and r["loss_scale"] == scale]
            n = len(mine)
            climbs = [r["climb"] for r in mine]
            finite = [c for c in climbs if math.isfinite(c)]
            lines.append(
                f"| x{scale:g} | {name} | {sum(c > 2 for c in climbs)}/{n} | {sum(c > 4 for c in climbs)}/{n} | "
                f"{sum(r['diverged'] for r in mine)}/{n} | {statistics.median(climbs):.3g} | "
                f"{max(climbs):.3g} | {statistics.median(r['warmup_ratio'] for r in mine):.3g} | "
                f"{100 * statistics.mean(r['final_test_acc'] for r in mine):.1f} |")
    return "\n".join(lines)


def _padded(runs, x_key, y_key):
    """x of the longest run and the seeds' y, NaN past a run that stopped early."""
    longest = max(runs, key=lambda r: len(r[x_key]))
    x = np.array(longest[x_key], dtype=float)
    if x_key.endswith("time_s"):  # the seeds' mean time at each point they share
        x = np.array([statistics.mean(r[x_key][i] for r in runs if i < len(r[x_key])) for i in range(len(x))])
    ys = np.full((len(runs), len(x)), np.nan)
    for j, r in enumerate(runs):
        ys[j, : len(r[y_key])] = r[y_key]
    return x, ys


def plot_sweep(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import STYLE

    colors = {**STYLE, "mlbfgs-paper": "tab:orange"}
    names = []
    for pname, problem in result["problems"].items():
        target = target_accuracy(problem)
        fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
        for opt in result["optimizers"]:
            mine = [r for r in problem["runs"] if r["optimizer"] == opt]
            label = f"{opt} (lr {problem['chosen_lr'][opt]:g})"
            for col, (x_key, ex_key) in enumerate((("step", "eval_step"), ("time_s", "eval_time_s"))):
                for row, (xk, yk) in enumerate(((x_key, "train_loss"), (ex_key, "test_acc"))):
                    x, ys = _padded(mine, xk, yk)
                    with np.errstate(all="ignore"):
                        mean, lo, hi = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
                    ax = axes[row, col]
                    ax.plot(x, mean, color=colors.get(opt), label=label, marker="o" if row else None, ms=3)
                    ax.fill_between(x, lo, hi, color=colors.get(opt), alpha=0.2)
        for col, xlabel in enumerate(("steps", "training wall-clock (s), shared 2-core machine")):
            axes[0, col].set(xlabel=xlabel, ylabel="train loss (running mean)", yscale="log")
            axes[1, col].set(xlabel=xlabel, ylabel=f"test accuracy ({problem['eval_subset']} images)")
            axes[1, col].axhline(target, color="black", lw=0.8, ls="--", label=f"target {100 * target:.1f}%")
            lo = min(min(r["test_acc"][-1] for r in problem["runs"]), target) - 0.05
            axes[1, col].set_ylim(max(0.0, lo), None)
        for ax in axes.flat:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{pname}: each optimizer at its chosen lr, mean and min-max over {len(result['seeds'])} seeds")
        fig.tight_layout()
        name = f"training_sweep_{pname}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    fig, axes = plt.subplots(1, len(result["problems"]), figsize=(5 * len(result["problems"]), 4), squeeze=False)
    for ax, (pname, problem) in zip(axes[0], result["problems"].items()):
        for opt in result["optimizers"]:
            rows = [r for r in problem["sweep"] if r["optimizer"] == opt]
            ax.plot([r["lr"] for r in rows], [0.0 if r["diverged"] else r["final_val_acc"] for r in rows],
                    marker="o", color=colors.get(opt), label=opt)
        ax.set(xscale="log", xlabel="learning rate", ylabel="final validation accuracy", title=pname)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training_sweep_lr.png", dpi=100)
    plt.close(fig)
    names.append("training_sweep_lr.png")
    stress = result.get("stress")
    if stress:
        scales = stress["loss_scales"]
        fig, axes = plt.subplots(len(scales), len(stress["optimizers"]), figsize=(11, 3.6 * len(scales)), squeeze=False)
        for i, scale in enumerate(scales):
            for j, opt in enumerate(stress["optimizers"]):
                ax = axes[i, j]
                for r in (r for r in stress["rows"] if r["optimizer"] == opt and r["loss_scale"] == scale):
                    ax.plot(r["step"], np.array(r["train_loss"]), color=colors.get(opt), alpha=0.5, lw=1)
                ax.axvline(2 * stress["update_period"], color="black", lw=0.8, ls="--", label="first pair")
                ax.set(yscale="log", xlabel="steps", ylabel="train loss (running mean)", title=f"{opt}, loss x{scale:g}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        fig.suptitle(f"Stress: digits MLP, batch {stress['batch_size']}, update_period={stress['update_period']}, "
                     f"lr={stress['lr']:g}, one line per seed")
        fig.tight_layout()
        fig.savefig(out / "training_sweep_stress.png", dpi=100)
        plt.close(fig)
        names.append("training_sweep_stress.png")
    return names


def write_sweep_report(result: dict, out: Path) -> Path:
    """``training_sweep.md`` and its plots from the sweep's JSON."""
    stamp = result.get("machine", {})
    loads = [r["load_average"] for p in result["problems"].values() for r in p["runs"] if r.get("load_average") is not None]
    lines = ["# Training: MLBFGS's step length, the paper's rule, SGD with momentum and AdamW", "",
             f"Machine: {stamp.get('cpu') or stamp.get('gpu')} ({stamp.get('cpu_count')} cores), {stamp.get('torch_threads')} "
             f"torch thread(s), torch {stamp.get('torch')}, Python {stamp.get('python')}.",
             "", "Commands, one process at a time, each writing its part into `training_sweep.json`:", ""]
    for c in result.get("commands", []):
        lines.append(f"- `{c['command']}`: {', '.join(c['parts'])}; {c['elapsed_s'] / 60:.1f} minutes, commit "
                     f"{c['commit'][:12]}{' (uncommitted changes)' if c['dirty'] else ''}, {c['date']}")
    lines.append("")
    if stamp.get("device") == "cpu":
        lines += [f"Wall-clock times come from a shared {stamp.get('cpu_count')}-core machine (other work ran beside "
                  f"this one; 1-minute load average {min(loads):.1f}-{max(loads):.1f} at the end of the runs): compare "
                  "them only within one problem, whose runs alternate between the optimizers.", ""] if loads else []
    lines += ["Protocol: " + "; ".join([
        f"every optimizer gets the same sweep budget, {len(next(iter(result['lr_grids'].values())))} learning rates "
        "on a log grid about half a decade apart (below)",
        result["selection"],
        f"then seeds {result['seeds']} (initialisation and batch order) at the chosen learning rate, reported on the test split",
        f"schedule: {result['schedule']}",
        "weight decay 5e-4 for all; MLBFGS with the paper's settings (momentum 0.9, history 10, update_period 50)",
        "wall-clock counts training steps only (forward, backward, step), not evaluation"]) + ".", ""]
    lines += ["| problem | data | model | batch | epochs | steps | train / validation / test |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for pname, p in result["problems"].items():
        lines.append(f"| {pname} | {p['dataset']} | {p['model']} | {p['batch_size']} | {p['epochs']} | {p['steps']} | "
                     f"{p['train_size']} / {p['val_size']} / {p['test_size']} |")
    lines += ["", "- " + "\n- ".join(f"{n}: {json.dumps(h)}" for n, h in result["hyperparameters"].items()), ""]
    lines += [f"- {n}: left out, {why}" for n, why in result.get("left_out", {}).items()]
    lines += ["## Test split, at the chosen learning rate", "", sweep_tables(result), ""]
    if result.get("stress"):
        lines += ["## Stress: the loss scaled by 50", "", stress_table(result["stress"]), ""]
    names = plot_sweep(result, out)
    lines += [f"![{n}]({n})" for n in names] + [""]
    path = out / "training_sweep.md"
    path.write_text("\n".join(lines))
    return path


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def sweep_main(args, parser, optimizers, device, out: Path, argv) -> dict:
    """``--sweep`` and/or ``--stress``: run them and merge into ``training_sweep.json``
    (a part not run again is kept from the file), then write the report."""
    path = out / "training_sweep.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    if args.report_only:
        if not previous:
            parser.error(f"--report-only: no {path}")
        print(f"report in {write_sweep_report(previous, out)}")
        return previous
    problems = _names(args.problems)
    if set(problems) - set(PROBLEMS):
        parser.error(f"unknown problems {sorted(set(problems) - set(PROBLEMS))} (expected some of {tuple(PROBLEMS)})")
    started = time.perf_counter()
    result = dict(previous)
    if args.sweep:
        specs = None
        if args.smoke:  # the digits MLP, tiny: checks that it runs
            problems, specs = ("digits-mlp",), {"digits-mlp": SMOKE_PROBLEM}
        seeds = (0, 1) if args.smoke else tuple(range(args.seeds))
        fresh = run_sweep(device, problems, optimizers, seeds, problem_specs=specs, verbose=not args.smoke)
        merged = {**previous.get("problems", {}), **fresh["problems"]}  # problems not run again are kept
        result.update(fresh, problems={p: merged[p] for p in sorted(merged, key=list(PROBLEMS).index)})
    if args.stress:
        kwargs = dict(seeds=range(2), epochs=1) if args.smoke else {}
        result["stress"] = run_stress(device, verbose=not args.smoke, **kwargs)
    if "problems" not in result:
        parser.error("--stress and --step-times alone need the sweep's results in the folder first (run --sweep)")
    if args.step_times:
        kwargs = dict(rounds=1, block=2, specs={p: SMOKE_PROBLEM for p in result["problems"]}) if args.smoke else {}
        result["step_times"] = measure_step_times(device, result["problems"], result["optimizers"], **kwargs)
    command = "python -m bench.train " + shlex.join(argv if argv is not None else sys.argv[1:])
    stamp = machine_stamp(device)
    result.setdefault("commands", []).append({
        "command": command, "elapsed_s": time.perf_counter() - started, "date": stamp["date"],
        "commit": stamp["commit"], "dirty": stamp["dirty"],
        "parts": list(problems if args.sweep else []) + (["stress"] if args.stress else [])
        + (["step-times"] if args.step_times else [])})
    result["machine"] = stamp
    path.write_text(json.dumps(result, indent=1))
    print(f"sweep results in {path}; report {write_sweep_report(result, out)}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<machine>/)")
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    parser.add_argument("--epochs", type=positive_int, default=None)
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--models", default="cnn,mlp", help=f"comma-separated, of {tuple(MODELS)}")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                        help=f"comma-separated, of {tuple(HYPERPARAMETERS)} (default {','.join(OPTIMIZERS)})")
    parser.add_argument("--train-subset", type=positive_int, default=None, help="use the first K training images")
    parser.add_argument("--smoke", action="store_true", help="digits, one epoch, two seeds: checks that it runs")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--sweep", action="store_true",
                        help="the learning-rate sweep on --problems, chosen on a validation split (training_sweep.*)")
    parser.add_argument("--stress", action="store_true", help="the loss-scale stress case of the digits MLP")
    parser.add_argument("--step-times", action="store_true",
                        help="the cost of a step of each optimizer of the sweep, timed round-robin")
    parser.add_argument("--problems", default=",".join(PROBLEMS), help=f"of the sweep, comma-separated, of {tuple(PROBLEMS)}")
    parser.add_argument("--report-only", action="store_true", help="rebuild training_sweep.md and its plots from the JSON")
    args = parser.parse_args(argv)
    optimizers = _names(args.optimizers)
    unknown = sorted(set(optimizers) - set(HYPERPARAMETERS))
    if unknown or not optimizers:
        parser.error(f"unknown optimizers {unknown} (expected some of {tuple(HYPERPARAMETERS)})")
    models = _names(args.models)
    if not models or set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))} (expected some of {tuple(MODELS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep or args.stress or args.step_times or args.report_only:
        return sweep_main(args, parser, optimizers, device, out, argv)
    if args.smoke:
        result = run_training(device, dataset="digits", models=models, optimizers=optimizers, seeds=(0, 1),
                              epochs=1, train_subset=512, verbose=False)
    else:
        result = run_training(device, dataset=args.dataset, models=models, optimizers=optimizers,
                              seeds=tuple(range(args.seeds)), epochs=args.epochs, train_subset=args.train_subset)
    result["machine"] = machine_stamp(device)
    (out / "training.json").write_text(json.dumps(result, indent=1))
    from .report import plot_training

    plot_training(result, out)
    print(f"training results in {out}")
    return result


if __name__ == "__main__":
    main()
