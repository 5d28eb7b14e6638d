"""Training runs: MLBFGS (the paper's math and the authors' released variant)
against SGD with momentum and AdamW.

``python -m bench.train`` trains a small CNN and an MLP on Fashion-MNIST when its
idx files are present (``apt-get install -y dataset-fashion-mnist``, Debian's
package, puts them under /usr/share/datasets/fashion-mnist/), else on
scikit-learn's bundled digits. Every optimizer gets the same runs: the same seeds
(model initialisation and batch order), data, epochs and learning-rate schedule.
It writes ``training.json`` (loss and test accuracy against steps and wall-clock,
per seed) into the machine's results folder; ``bench.report`` plots it. MLBFGS
runs on the fastest backend that works on the device (Triton, else CUDA C++, on a
GPU; the C++ kernels, else foreach, on the CPU).

Optimizers (``--optimizers``): ``mlbfgs`` (``variant="paper"``), ``mlbfgs-released``
(``variant="released"``, docs/design.md, "The released variant"), ``sgd-momentum``,
``adamw``, and on request ``authors-style`` (the re-implementation of the authors'
step in ``bench/baselines/``: the released math, their implementation's speed).
An MLBFGS variant that the chosen backend does not implement is left out, with a note.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

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
    "mlbfgs": {**MLBFGS_HYPER, "variant": "paper", "normalize": True},
    "mlbfgs-released": {**MLBFGS_HYPER, "variant": "released", "normalize": True},
    "sgd-momentum": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=5e-4),
    "authors-style": MLBFGS_HYPER,
}
EVAL_SUBSET = 5000  # test images behind the curves (the final accuracy uses them all)
SCHEDULE = "cosine annealing to 0 over all steps, stepped every mini-batch"
OPTIMIZERS = ("mlbfgs", "mlbfgs-released", "sgd-momentum", "adamw")  # the default set


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


def make_optimizer(name: str, params, device: torch.device):
    hyper = HYPERPARAMETERS[name]
    if name in ("mlbfgs", "mlbfgs-released"):
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
def train_one(model_kind, opt_name, seed, data: Dataset, epochs, batch_size, device, evals_per_epoch=2):
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    torch.manual_seed(seed)
    model = MODELS[model_kind](data).to(device)
    opt, backend = make_optimizer(opt_name, list(model.parameters()), device)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sched_opt = opt.sgd if isinstance(opt, AuthorsStyleMLBFGS) else opt
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(sched_opt, T_max=total)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    x_eval, y_eval = x_test[:EVAL_SUBSET], y_test[:EVAL_SUBSET]
    gen = torch.Generator().manual_seed(seed)
    record = {"step": [], "time_s": [], "train_loss": [], "eval_step": [], "eval_time_s": [], "test_loss": [], "test_acc": []}
    wall, step, running, count, step_times = 0.0, 0, 0.0, 0, []
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
            loss.backward()
            opt.step()
            scheduler.step()
            loss_value = loss.item()  # also waits for the device
            step_times.append(time.perf_counter() - t0)
            wall += step_times[-1]
            step += 1
            running, count = running + loss_value, count + 1
            if step % 10 == 0 or step == total:
                record["step"].append(step)
                record["time_s"].append(wall)
                record["train_loss"].append(running / count)
                running, count = 0.0, 0
            if (step % eval_every == 0 and total - step >= eval_every // 2) or step == total:
                test_loss, test_acc = evaluate(model, x_eval, y_eval)  # a fixed subset: the curves
                for key, value in zip(("eval_step", "eval_time_s", "test_loss", "test_acc"), (step, wall, test_loss, test_acc)):
                    record[key].append(value)
    test_loss, test_acc = evaluate(model, x_test, y_test)  # the whole test set: the final numbers
    record.update(final_test_acc=test_acc, final_test_loss=test_loss, train_time_s=wall, backend=backend,
                  median_step_ms=1e3 * statistics.median(step_times), load_average=load_average(),
                  params=sum(p.numel() for p in model.parameters()), steps=step)
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
    left_out = {}
    backend = mlbfgs_backend(device)
    for name in optimizers:
        variant = HYPERPARAMETERS[name].get("variant")
        reason = variant and variant_runs(variant, backend, device)
        if reason:
            left_out[name] = reason
            print(f"  {name} left out: {reason}", flush=True)
    optimizers = [name for name in optimizers if name not in left_out]
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
    args = parser.parse_args(argv)
    optimizers = tuple(name.strip() for name in args.optimizers.split(",") if name.strip())
    unknown = sorted(set(optimizers) - set(HYPERPARAMETERS))
    if unknown or not optimizers:
        parser.error(f"unknown optimizers {unknown} (expected some of {tuple(HYPERPARAMETERS)})")
    models = tuple(name.strip() for name in args.models.split(",") if name.strip())
    if not models or set(models) - set(MODELS):
        parser.error(f"unknown models {sorted(set(models) - set(MODELS))} (expected some of {tuple(MODELS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
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
