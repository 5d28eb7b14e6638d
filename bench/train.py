"""Training runs: MLBFGS against SGD with momentum, AdamW and the authors'-style step.

``python -m bench.train`` trains a small CNN and an MLP on Fashion-MNIST when its
idx files are present (``apt-get install dataset-fashion-mnist``, Debian's package,
puts them under /usr/share/datasets/fashion-mnist/), else on scikit-learn's bundled
digits, with every optimizer for the same epochs and seeds, and writes
``training.json`` (loss and test accuracy against steps and wall-clock, per seed)
into the machine's results folder; ``bench.report`` plots it. MLBFGS runs fused
(Triton) on CUDA and on the foreach backend on the CPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlbfgs_fused import MLBFGS

from .baselines import AuthorsStyleMLBFGS
from .contenders import mlbfgs_backend_works
from .machine import default_device, machine_stamp, results_dir
from .timing import load_average

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_HINT = (
    "Fashion-MNIST not found under /usr/share/datasets/fashion-mnist/; using scikit-learn's digits. "
    "Install it with: sudo apt-get install dataset-fashion-mnist"
)

# The authors' published mL-BFGS settings; the first-order baselines get the usual ones.
MLBFGS_HYPER = dict(
    lr=0.1, momentum=0.9, weight_decay=5e-4, history_size=10, update_period=50,
    betas=(0.999, 0.999), pair_momentum=0.9, damping=0.01,
)
HYPERPARAMETERS = {
    "mlbfgs": MLBFGS_HYPER,
    "authors-style": MLBFGS_HYPER,
    "sgd-momentum": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=5e-4),
}
EVAL_SUBSET = 5000  # test images behind the curves (the final accuracy uses them all)
SCHEDULE = "cosine annealing to 0 over all steps, stepped every mini-batch"
OPTIMIZERS = tuple(HYPERPARAMETERS)


# -- data -------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (directory / name).exists():
            return directory / name
    return None


def load_dataset(prefer: str = "fashion-mnist"):
    """``(name, x_train, y_train, x_test, y_test)``: images ``[n, 1, H, W]`` standardised, labels int64."""
    files = {
        key: _find(FASHION_MNIST_DIR, stem)
        for key, stem in {
            "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
            "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
        }.items()
    }
    if prefer == "fashion-mnist" and all(files.values()):
        arrays = {key: _read_idx(path) for key, path in files.items()}
        name = "fashion-mnist"
        x_train, x_test = (torch.from_numpy(arrays[k].astype(np.float32) / 255.0).unsqueeze(1) for k in ("x_train", "x_test"))
        y_train, y_test = (torch.from_numpy(arrays[k].astype(np.int64)) for k in ("y_train", "y_test"))
    else:
        if prefer == "fashion-mnist":
            print(FASHION_MNIST_HINT)
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        xa, xb, ya, yb = train_test_split(images, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
        name = "digits"
        x_train, x_test = torch.from_numpy(xa).unsqueeze(1), torch.from_numpy(xb).unsqueeze(1)
        y_train, y_test = torch.from_numpy(ya.astype(np.int64)), torch.from_numpy(yb.astype(np.int64))
    mean, std = x_train.mean(), x_train.std()
    return name, (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


# -- models -----------------------------------------------------------------------
def make_model(kind: str, image_shape: tuple[int, int, int], classes: int = 10) -> nn.Module:
    c, h, w = image_shape
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, classes)
        )
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), classes),
        )
    raise ValueError(f"unknown model {kind!r}")


def make_optimizer(name: str, params, device: torch.device):
    hyper = HYPERPARAMETERS[name]
    if name == "mlbfgs":
        backend = "triton" if device.type == "cuda" and mlbfgs_backend_works("triton", device) else "foreach"
        return MLBFGS(params, backend=backend, **hyper), backend
    if name == "authors-style":
        return AuthorsStyleMLBFGS(params, **hyper), None
    if name == "sgd-momentum":
        return torch.optim.SGD(params, **hyper), None
    if name == "adamw":
        return torch.optim.AdamW(params, **hyper), None
    raise ValueError(name)


# -- one run ----------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, x, y, batch: int = 2000) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        loss += nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    model.train()
    return loss / len(x), correct / len(x)


def train_one(model_kind, opt_name, seed, data, epochs, batch_size, device, evals_per_epoch=2):
    _, x_train, y_train, x_test, y_test = (d.to(device) if torch.is_tensor(d) else d for d in data)
    torch.manual_seed(seed)
    model = make_model(model_kind, tuple(x_train.shape[1:])).to(device)
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
    name, x_train, y_train, x_test, y_test = data
    if train_subset:
        x_train, y_train = x_train[:train_subset], y_train[:train_subset]
        data = (name, x_train, y_train, x_test, y_test)
    if epochs is None:
        # Stated in RESULTS.md: fewer epochs on a CPU (a 15-minute budget for all of bench.run).
        epochs = {"cnn": 2, "mlp": 3} if device.type == "cpu" else {"cnn": 10, "mlp": 10}
    elif isinstance(epochs, int):
        epochs = {m: epochs for m in models}
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
        "dataset": name,
        "eval_subset": min(EVAL_SUBSET, len(x_test)),
        "train_size": len(x_train),
        "test_size": len(x_test),
        "batch_size": batch_size,
        "epochs": epochs,
        "seeds": list(seeds),
        "hyperparameters": HYPERPARAMETERS,
        "schedule": SCHEDULE,
        "runs": runs,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/<machine>/)")
    parser.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=None, help="use the first K training images")
    parser.add_argument("--smoke", action="store_true", help="digits, one epoch, two seeds: checks that it runs")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        result = run_training(device, dataset="digits", seeds=(0, 1), epochs=1, train_subset=512, verbose=False)
    else:
        result = run_training(device, dataset=args.dataset, seeds=tuple(range(args.seeds)), epochs=args.epochs,
                              train_subset=args.train_subset)
    result["machine"] = machine_stamp(device)
    (out / "training.json").write_text(json.dumps(result, indent=1))
    from .report import plot_training

    plot_training(result, out)
    print(f"training results in {out}")
    return result


if __name__ == "__main__":
    main()
