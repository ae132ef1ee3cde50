"""Does batch norm let a deep sigmoid network train, and at larger learning rates? (Two common claims, tested.)

A deep MLP (``--depth`` hidden layers of 64 sigmoid units) learns scikit-learn's
bundled 8x8 digits, with plain SGD, four ways: without batch norm and with
normserve's batch norm (Linear -> BatchNorm -> sigmoid: before the
activation), each at learning rates 0.01 and 0.1. The batch norm layers run
on a normserve server (``convert_to_remote``); a local torch copy of the same
network trains alongside as a check that the remote layers compute what
torch's do.

    python examples/train_digits.py                     # starts its own server
    python examples/train_digits.py --target host:port  # or uses yours

It prints the final test accuracies and writes a PNG of the loss and
accuracy curves (``--plot``). ``--quick`` runs a short version (the test suite uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from normserve.client import NormClient
from normserve.client.torch import convert_to_remote
from normserve.tools.bench import normserve_server

LEARNING_RATES = (0.01, 0.1)
WIDTH = 64
BATCH = 64
#: --quick trains on this many of the training images: 5 batches an epoch, so its ~300 calls per epoch and
#: learning rate (2 per remote layer and batch) finish in seconds; the full run's 23 batches make ~1500.
QUICK_TRAIN = 5 * BATCH


def digits(seed: int = 0, train_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """Train and test splits (80/20) of the 1797 digits, standardized with the training split's statistics;
    ``train_size`` keeps that many of the training images (the test split stays whole)."""
    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = data.data[order].astype(np.float32), data.target[order]
    cut = int(0.8 * len(y))
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-6
    x = (x - mean) / std
    kept = cut if train_size is None else min(cut, train_size)
    return torch.tensor(x[:kept]), torch.tensor(y[:kept]), torch.tensor(x[cut:]), torch.tensor(y[cut:])


def mlp(depth: int, batch_norm: bool, seed: int = 0) -> nn.Sequential:
    """``depth`` hidden layers: Linear -> (BatchNorm) -> sigmoid; the same Linear weights either way."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width_in = 64
    for _ in range(depth):
        layers.append(nn.Linear(width_in, WIDTH))
        if batch_norm:
            layers.append(nn.BatchNorm1d(WIDTH))
        layers.append(nn.Sigmoid())
        width_in = WIDTH
    layers.append(nn.Linear(width_in, 10))
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        hits = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return hits


def train(
    models: list[nn.Module], lr: float, epochs: int, data: tuple[torch.Tensor, ...]
) -> list[dict[str, list[float]]]:
    """Train ``models`` (equal copies) on the same batches; per model, loss per epoch and test accuracy."""
    x_train, y_train, x_test, y_test = data
    optimizers = [torch.optim.SGD(model.parameters(), lr=lr) for model in models]
    history = [{"loss": [], "accuracy": []} for _ in models]
    order = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        losses = [[] for _ in models]
        for batch in torch.randperm(len(y_train), generator=order).split(BATCH):
            if len(batch) < 2:  # a batch norm batch needs two samples
                continue
            for model, optimizer, seen in zip(models, optimizers, losses, strict=True):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
                loss.backward()
                optimizer.step()
                seen.append(loss.item())
        for model, record, seen in zip(models, history, losses, strict=True):
            record["loss"].append(float(np.mean(seen)))
            record["accuracy"].append(accuracy(model, x_test, y_test))
    return history


def server(target: str | None) -> contextlib.AbstractContextManager[str]:
    """``target``, or a ``normserve serve`` of our own on a free port with a scratch state folder."""
    return contextlib.nullcontext(target) if target is not None else normserve_server()


def plot(results: dict[str, dict[str, list[float]]], path: Path, depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, record in results.items():
        style = "-" if "batch norm" in label else "--"
        epochs = range(1, len(record["loss"]) + 1)
        ax_loss.plot(epochs, record["loss"], style, label=label)
        ax_acc.plot(epochs, record["accuracy"], style, label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", ylim=(0, 1))
    ax_acc.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"digits, {depth} sigmoid hidden layers, plain SGD: batch norm on a normserve server vs none")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="a running normserve server (default: start one)")
    parser.add_argument("--depth", type=int, default=10, help="hidden layers (at least 8)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--quick", action="store_true", help=f"2 epochs of 8 layers on {QUICK_TRAIN} training images: a smoke run"
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path(__file__).parent / "out" / "digits.png",
        help="PNG of the curves (default: examples/out/; --plot examples/digits.png refreshes the docs' image)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.epochs = 8, 2
    if args.depth < 8:
        parser.error("--depth must be at least 8: the point is a deep sigmoid network")

    data = digits(train_size=QUICK_TRAIN if args.quick else None)
    results: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    with server(args.target) as target, NormClient(target) as client:
        for lr in LEARNING_RATES:
            (plain,) = train([mlp(args.depth, batch_norm=False)], lr, args.epochs, data)
            local = mlp(args.depth, batch_norm=True)
            remote = convert_to_remote(copy.deepcopy(local), client, prefix=f"examples.digits.lr{lr}.")
            remote_run, local_run = train([remote, local], lr, args.epochs, data)
            results[f"no batch norm, lr {lr}"] = plain
            results[f"batch norm (normserve), lr {lr}"] = remote_run
            gap = max(abs(a - b) / b for a, b in zip(remote_run["loss"], local_run["loss"], strict=True))
            print(f"lr {lr}: remote vs torch batch norm, largest relative gap in epoch loss {gap:.1e}")
    print(f"{args.depth} sigmoid hidden layers, {args.epochs} epochs, SGD ({time.perf_counter() - started:.0f} s)")
    for label, record in results.items():
        print(f"  {label:32s} final test accuracy {record['accuracy'][-1]:6.1%}   loss {record['loss'][-1]:.3f}")
    plot(results, args.plot, args.depth)
    print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
