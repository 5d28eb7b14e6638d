"""Train a small network on real data with MLBFGS, AdamW and SGD, side by side.

    python -m mlbfgs_fused.demo [--dataset auto|digits|fashion-mnist] [--epochs N]

Data: Fashion-MNIST when its idx files are present (Debian's package
``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist/;
``apt-get install -y dataset-fashion-mnist`` as root; ``MLBFGS_FASHION_MNIST_DIR``
names another folder holding the four ``*-ubyte.gz`` files), else scikit-learn's
bundled digits. Runs on CUDA with the fused backend when one is available, on the CPU
with the foreach backend otherwise. Prints a table and writes a PNG of the
training loss against steps and against wall-clock time.
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import MLBFGS

# Where Debian's package puts the idx files; the variable points elsewhere (a copy
# carried to a machine without the package, for instance).
FASHION_MNIST_DIR = Path(os.environ.get("MLBFGS_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # [n, 1, h, w] float32, standardised
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def classes(self) -> int:
        return int(self.y_train.max()) + 1


def _read_idx(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_HINT = (
    f"Fashion-MNIST is not in {FASHION_MNIST_DIR}/: using scikit-learn's digits. "
    f"To train on it: {FASHION_MNIST_INSTALL} (as root), or set MLBFGS_FASHION_MNIST_DIR "
    "to a folder holding its four idx files"
)


def fashion_mnist_missing(directory: Path) -> str:
    return (
        f"Fashion-MNIST is not in {directory}/. Install it with `{FASHION_MNIST_INSTALL}` "
        "(as root; Debian's package), set MLBFGS_FASHION_MNIST_DIR to a folder holding its "
        "four idx files, or use --dataset digits (scikit-learn's bundled digits)."
    )


def fashion_mnist_present(directory: Path | None = None) -> bool:
    directory = FASHION_MNIST_DIR if directory is None else directory
    return all(
        (directory / f"{split}-{kind}-idx{dim}-ubyte.gz").exists()
        for split in ("train", "t10k")
        for kind, dim in (("images", 3), ("labels", 1))
    )


def load_dataset(name: str = "auto", directory: Path | None = None) -> Dataset:
    """``"fashion-mnist"`` (60k/10k 28x28), ``"digits"`` (1797 8x8, 80/20 split) or
    ``"auto"`` (the first when its files are present).

    Raises FileNotFoundError, saying how to install it, when Fashion-MNIST is asked
    for and absent."""
    directory = FASHION_MNIST_DIR if directory is None else directory
    if name == "auto":
        name = "fashion-mnist" if fashion_mnist_present(directory) else "digits"
        if name == "digits":
            print(FASHION_MNIST_HINT)
    if name == "fashion-mnist":
        if not fashion_mnist_present(directory):
            raise FileNotFoundError(fashion_mnist_missing(directory))
        parts = [
            _read_idx(directory / f"{split}-{kind}-idx{dim}-ubyte.gz")
            for split in ("train", "t10k")
            for kind, dim in (("images", 3), ("labels", 1))
        ]
        x_train, y_train, x_test, y_test = parts
        x_train, x_test = x_train.float().unsqueeze(1) / 255, x_test.float().unsqueeze(1) / 255
    elif name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - the demo extra installs it
            raise SystemExit("the digits data needs scikit-learn: pip install 'mlbfgs_fused[demo]'") from e
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
        y = torch.tensor(digits.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        split = int(0.8 * len(y))
        x_train, y_train, x_test, y_test = x[perm[:split]], y[perm[:split]], x[perm[split:]], y[perm[split:]]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    mean, std = x_train.mean(), x_train.std()
    return Dataset(name, (x_train - mean) / std, y_train.long(), (x_test - mean) / std, y_test.long())


def small_cnn(data: Dataset) -> nn.Module:
    side = data.x_train.shape[-1]
    pooled = side // 4
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * pooled * pooled, 64), nn.ReLU(), nn.Linear(64, data.classes),
    )


def mlp(data: Dataset, hidden: int = 128) -> nn.Module:
    inputs = data.x_train[0].numel()
    return nn.Sequential(
        nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, data.classes),
    )


def make_optimizer(name: str, model: nn.Module, device: torch.device, update_period: int = 50):
    """The optimizers the demo compares, with the mL-BFGS paper's settings."""
    params = list(model.parameters())
    if name == "MLBFGS":
        return MLBFGS(params, lr=0.1, momentum=0.9, weight_decay=5e-4, history_size=10,
                      update_period=update_period, fused=device.type == "cuda" or None)
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4)
    if name == "SGD":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    raise ValueError(name)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensors in ``optimizer.state``, each storage counted once."""
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v)

    for st in optimizer.state.values():
        visit(st)
    return total


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    model.train()
    return loss / len(y), correct / len(y)


def train(name, data, device, epochs, batch_size, seed, model_fn, update_period, progress=None):
    """Train one model; returns per-step losses and wall-clock times, final test
    metrics and timings."""
    torch.manual_seed(seed)
    model = model_fn(data).to(device)
    optimizer = make_optimizer(name, model, device, update_period)
    steps_per_epoch = math.ceil(len(data.y_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    losses, times, step_time, wall = [], [], 0.0, 0.0
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y_train), generator=gen).to(device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            started = time.perf_counter()
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time += time.perf_counter() - start
            scheduler.step()
            losses.append(loss.item())  # waits for the device: the iteration is over
            wall += time.perf_counter() - started
            times.append(wall)
            if progress is not None:
                progress.update(1)
    test_loss, test_acc = evaluate(model, data.x_test.to(device), data.y_test.to(device))
    return dict(
        optimizer=name, losses=losses, times=times, test_loss=test_loss, test_acc=test_acc,
        ms_per_step=1e3 * step_time / len(losses), train_s=wall, state_bytes=state_bytes(optimizer),
        params=sum(p.numel() for p in model.parameters()),
    )


def smoothing_window(steps: int) -> int:
    """Steps per moving-average window of the plotted loss: about 2% of the run."""
    return max(1, steps // 50)


def plot_curves(results: list[dict], path: Path, title: str):
    """Training loss (moving average) against steps and against wall-clock time,
    two panels side by side; the window is in the axis label. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = smoothing_window(min(len(r["losses"]) for r in results))
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for r in results:
        losses = torch.tensor(r["losses"])
        smooth = losses.unfold(0, window, 1).mean(1) if window > 1 else losses
        steps = range(window, len(losses) + 1)  # a window ends at its last step
        times = r["times"][window - 1 :]
        label = f"{r['optimizer']} ({100 * r['test_acc']:.1f}% test)"
        by_step.plot(steps, smooth, label=label)
        by_time.plot(times, smooth, label=label)
    averaged = f"training loss, moving average over {window} step{'s' if window > 1 else ''}"
    by_step.set_xlabel("step")
    by_step.set_ylabel(averaged)
    by_step.set_yscale("log")
    by_time.set_xlabel("wall-clock training time (s): forward, backward, step")
    by_step.legend(title=f"smoothing: {window}-step window")
    for ax in (by_step, by_time):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="auto", choices=["auto", "digits", "fashion-mnist"])
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="default: 5 (Fashion-MNIST) or 40 (digits)")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--train-subset", type=positive_int, default=None,
                        help="use the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_output", help="folder for the PNG")
    args = parser.parse_args(argv)
    if args.dataset == "fashion-mnist" and not fashion_mnist_present():
        parser.error(fashion_mnist_missing(FASHION_MNIST_DIR))

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset(args.dataset)
    if args.train_subset:
        data.x_train, data.y_train = data.x_train[: args.train_subset], data.y_train[: args.train_subset]
    epochs = args.epochs or (5 if data.name == "fashion-mnist" else 40)
    # A pair every 50 steps needs a few hundred steps to matter; digits gives 12 a epoch.
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    update_period = min(50, max(5, epochs * steps_per_epoch // 20))
    model_fn = mlp if args.model == "mlp" else small_cnn
    print(f"{data.name}: {len(data.y_train)} train / {len(data.y_test)} test, model {args.model}, "
          f"{epochs} epochs of {steps_per_epoch} steps, device {device}, MLBFGS update_period {update_period}")

    results = []
    for name in ("MLBFGS", "AdamW", "SGD"):
        bar = tqdm(total=epochs * steps_per_epoch, desc=f"{name:>6}", leave=True) if tqdm else None
        results.append(train(name, data, device, epochs, args.batch_size, args.seed, model_fn,
                             update_period, bar))
        if bar is not None:
            bar.close()

    print()
    print("| optimizer | final train loss | test loss | test accuracy | ms / step | train s | state bytes | bytes / param |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        tail = sum(r["losses"][-20:]) / len(r["losses"][-20:])
        print(f"| {r['optimizer']} | {tail:.4f} | {r['test_loss']:.4f} | {100 * r['test_acc']:.2f}% | "
              f"{r['ms_per_step']:.3f} | {r['train_s']:.1f} | {r['state_bytes']:,} | "
              f"{r['state_bytes'] / r['params']:.1f} |")
    print("(ms / step: optimizer.step alone; train s: forward, backward and step over the run)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover
        print("matplotlib is not installed: no plot written")
        return
    path = out / f"loss_{data.name}_{args.model}.png"
    plot_curves(results, path, f"{data.name}, {args.model}, {device.type}")
    print(f"\nloss curves written to {path}")


if __name__ == "__main__":
    main()
