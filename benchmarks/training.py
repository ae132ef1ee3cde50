"""Training steps through normserve.client.torch, against their peers in the same run.

First, whole models in statistics mode (issue 27: a step's cost must not grow with the number of norm
layers): an SGD step of a one-batch-norm MLP, and of ResNet-18- and ResNet-50-shaped CNNs (20 and 53
batch norms) for 32 x 32 images, local torch against the converted model (``mode="statistics"``) on a
local server, in alternating rounds; each statistics round ends by waiting for every update to be stored
(``settle_updates``). Goals: ratio <= 1.05 for the CNNs, <= 1.15 for the MLP.

Then a training step of one batch norm layer, every mode:

Per case (float32 input), the median time of one training step (forward,
backward, and a changed weight, as after an optimizer step):

* ``torch``: a local torch.nn.BatchNorm (the math alone, no service);
* ``echo``: two round trips of the same bytes to a bare gRPC echo server
  (x out and y back, then dy out and dx back): the transport's floor;
* ``remote``: a RemoteBatchNorm module (one Train carrying the new weight and
  keeping x, one Gradient sending dy);
* ``sync x1``: the same with a sync group of one rank (the rendezvous' own cost);
* ``sync x4``: four ranks on threads, each with its own client and a quarter
  of the batch, per synchronized step (all four done);
* ``small echo``: one round trip of a TrainStatistics' size (per-channel
  statistics out, statistics and running statistics back);
  (statistics mode's columns are timed in rounds of their own, with torch and
  the small echo: interleaved with megabyte transfers, small calls slow down);
* ``stats``, ``stats sync x1``, ``stats sync x4``: the same three in
  statistics mode (``mode="statistics"``: torch computes, one TrainStatistics
  per step, plus one GradientStatistics per step under sync).

Statistics mode's goal: ``stats`` <= 1.3 x (``torch`` + ``small echo``), torch timed in the same rounds
(``stats_vs_goal`` in the JSON is that ratio).

    python benchmarks/training.py               # tables + benchmarks/out/training.json + training.png
    python benchmarks/training.py --depth-only  # the whole models only
    python benchmarks/training.py --quick       # few repeats (a smoke test)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normserve.client import NormClient, SyncGroup
from normserve.client.torch import RemoteBatchNorm1d, RemoteBatchNorm2d, RemoteNorm, convert_to_remote, settle_updates
from normserve.tools import children
from normserve.tools.bench import Echo, alternate, echo_server, normserve_server, quartiles

OUT = Path(__file__).parent / "out"
CASES = {"mlp-256x512": (256, 512), "conv-32x64x16x16": (32, 64, 16, 16)}
RANKS = 4


def _step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            module.weight.add_(1e-4)  # as an optimizer step would: the next Train carries the new weight
        x.grad = None
        module(x).backward(dy)

    return step


def _remote(
    shape: tuple[int, ...], client: NormClient, name: str, group: SyncGroup | None = None, mode: str = "tensors"
) -> nn.Module:
    cls = RemoteBatchNorm1d if len(shape) == 2 else RemoteBatchNorm2d
    return cls(shape[1], client=client, name=name, sync_group=group, mode=mode)


def _synced_ranks(shape: tuple[int, ...], target: str, name: str, steps: int, mode: str) -> float:
    """Median ms per synchronized step of RANKS threads, each with a quarter of the batch."""
    part = (shape[0] // RANKS, *shape[1:])
    barrier = threading.Barrier(RANKS)
    ends: list[list[float]] = [[] for _ in range(RANKS)]
    group_id = f"{name}-{time.monotonic_ns()}"

    def rank(r: int) -> None:
        with NormClient(target) as nc:
            module = _remote(shape, nc, name, SyncGroup(group_id, RANKS, r), mode)
            step = _step(module, torch.randn(part, requires_grad=True), torch.randn(part))
            step()  # warm up (step 0)
            barrier.wait()
            for _ in range(steps):
                step()
                ends[r].append(time.perf_counter())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(RANKS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done = [max(end[i] for end in ends) for i in range(steps)]  # a step is over when its last rank is
    return statistics.median(b - a for a, b in itertools.pairwise(done)) * 1e3


def measure(target: str, echo: Echo, repeats: int) -> list[dict[str, Any]]:
    rows = []
    with NormClient(target) as nc:
        for label, shape in CASES.items():
            x, dy = torch.randn(shape, requires_grad=True), torch.randn(shape)
            nbytes = x.numel() * 4
            local = (nn.BatchNorm1d if len(shape) == 2 else nn.BatchNorm2d)(shape[1])
            name, channels = f"bench.{label}", shape[1]
            # Each mode alternates with its own peers: a neighbour moving megabytes (the echo of x, a Train)
            # would otherwise slow the small calls after it (caches, allocator), and the comparison is per mode.
            tensors = {
                "torch": _step(local, x, dy),
                "echo": lambda n=nbytes: (echo.unary(n, n), echo.unary(n, n)),
                "remote": _step(_remote(shape, nc, name), x, dy),
                "sync x1": _step(_remote(shape, nc, f"{name}.s1", SyncGroup("bench", 1, 0)), x, dy),
            }
            statistics_mode = {
                "torch": _step(local, x, dy),
                "small echo": lambda c=channels: echo.unary(16 * c + 64, 24 * c + 64),
                "stats": _step(_remote(shape, nc, f"{name}.stats", mode="statistics"), x, dy),
                "stats sync x1": _step(
                    _remote(shape, nc, f"{name}.stats.s1", SyncGroup("bench-stats", 1, 0), "statistics"), x, dy
                ),
            }
            times = alternate(tensors, repeats, lambda: None)
            by_statistics = alternate(statistics_mode, repeats, lambda: None)
            torch_beside_statistics = by_statistics.pop("torch")  # the goal's torch: timed in the same rounds
            times.update(by_statistics)
            for mode, column in (("tensors", "sync x4"), ("statistics", "stats sync x4")):
                times[column] = _synced_ranks(shape, target, f"{name}.{mode}.s4", max(repeats // 2, 5), mode)
            times = {column: times[column] for column in COLUMNS}
            goal = times["stats"] / (torch_beside_statistics + times["small echo"])
            row = {"case": label, "shape": list(shape), "x_bytes": nbytes, "ms": times, "stats_vs_goal": goal}
            rows.append(row)
            print(_format(row), flush=True)
    return rows


# ---------------------------------------------------------------------- depth: whole models (issue 27)
class _Basic(nn.Module):
    """ResNet's basic block (two 3x3 convolutions), with a 1x1 projection when the shape changes."""

    expansion = 1

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.body = self._body(inputs, width, stride)
        self.project = (
            nn.Sequential(nn.Conv2d(inputs, out, 1, stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inputs != out
            else nn.Identity()
        )

    @staticmethod
    def _body(inputs: int, width: int, stride: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(inputs, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.project(x))


class _Bottleneck(_Basic):
    """ResNet-50's block: 1x1 down, 3x3, 1x1 up (four times the width)."""

    expansion = 4

    @staticmethod
    def _body(inputs: int, width: int, stride: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(inputs, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width * 4, 1, bias=False), nn.BatchNorm2d(width * 4),
        )  # fmt: skip


def resnet_shaped(block: type[_Basic], stages: tuple[int, ...], width: int = 64, classes: int = 10) -> nn.Module:
    """A ResNet of ``stages`` blocks per stage for 32 x 32 images (a 3x3 stem, as CIFAR ResNets): ResNet-18
    is ``(_Basic, (2, 2, 2, 2))`` (20 batch norms), ResNet-50 ``(_Bottleneck, (3, 4, 6, 3))`` (53)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    inputs = width
    for stage, count in enumerate(stages):
        for index in range(count):
            layers.append(block(inputs, width << stage, 2 if stage and not index else 1))
            inputs = (width << stage) * block.expansion
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes))


def mlp_one_norm() -> nn.Module:
    """The smallest step with a batch norm: Linear, BatchNorm1d(512), ReLU, Linear (batch 256 of 256)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 10))


def models(quick: bool) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """name -> (model, input shape): the depth cases (``quick``: the same depths, narrow and small)."""
    width, batch, side = (4, 4, 8) if quick else (64, 32, 32)
    return {
        "mlp, 1 BN": (mlp_one_norm, (256, 256)),
        "resnet18-shaped, 20 BN": (lambda: resnet_shaped(_Basic, (2, 2, 2, 2), width), (batch, 3, side, side)),
        "resnet50-shaped, 53 BN": (
            lambda: resnet_shaped(_Bottleneck, (3, 4, 6, 3), width // 2),
            (batch // 2, 3, side, side),
        ),
    }


def _model_step(model: nn.Module, shape: tuple[int, ...], settle: Callable[[], None]) -> Callable[[int], None]:
    """``steps`` SGD steps of ``model`` on a fixed batch, then ``settle`` (what a state read waits for)."""
    data = torch.Generator().manual_seed(1)
    x, target = torch.randn(shape, generator=data), torch.randint(0, 10, (shape[0],), generator=data)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), target).backward()
            optimizer.step()
        settle()

    return run


#: Seconds of local steps per round at least (see measure_depth).
ROUND_SECONDS = 0.5


def measure_depth(target: str, rounds: int, steps: int, quick: bool = False) -> list[dict[str, Any]]:
    """Per model: ms per training step, local torch and statistics mode (the pipeline drained at the end of
    each round of ``steps`` steps, so nothing is left in flight), alternating rounds; median and quartiles."""
    rows = []
    with NormClient(target) as nc:
        for label, (make, shape) in models(quick).items():
            remote = convert_to_remote(make(), nc, mode="statistics")
            norms = sum(isinstance(m, RemoteNorm) for m in remote.modules())
            runs = {
                "torch": _model_step(make(), shape, lambda: None),
                "statistics": _model_step(remote, shape, lambda model=remote: settle_updates(model)),
            }
            for run in runs.values():
                run(2)  # warm up: the first steps allocate, and open the stream
            start = time.perf_counter()
            runs["torch"](2)
            # Rounds of at least `steps` steps and about ROUND_SECONDS: the drain that ends a round (a state
            # read's wait) is paid once per round, as a job pays it once per checkpoint or evaluation.
            round_seconds = ROUND_SECONDS / 10 if quick else ROUND_SECONDS
            steps = max(steps, round(round_seconds / ((time.perf_counter() - start) / 2)))
            samples: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(steps)
                    samples[name].append((time.perf_counter() - start) * 1e3 / steps)
            ms = {name: quartiles(values) for name, values in samples.items()}
            ratio = quartiles([r / t for r, t in zip(samples["statistics"], samples["torch"], strict=True)])
            row = {"model": label, "shape": list(shape), "norms": norms, "steps": steps, "ms": ms, "ratio": ratio}
            rows.append(row)
            print(_format_depth(row), flush=True)
    return rows


DEPTH_HEADER = (
    f"{'model':24s} {'norms':>5s} {'torch ms (q1-q3)':>24s} {'statistics ms (q1-q3)':>24s} {'ratio (q1-q3)':>20s}"
)


def _format_depth(row: dict[str, Any]) -> str:
    def cell(q: dict[str, float], digits: int = 2) -> str:
        return f"{q['median']:.{digits}f} ({q['q1']:.{digits}f}-{q['q3']:.{digits}f})"

    ms = row["ms"]
    return (
        f"{row['model']:24s} {row['norms']:5d} {cell(ms['torch']):>24s} {cell(ms['statistics']):>24s} "
        f"{cell(row['ratio'], 3):>20s}"
    )


COLUMNS = ("torch", "echo", "small echo", "remote", "sync x1", "sync x4", "stats", "stats sync x1", "stats sync x4")
HEADER = f"{'case':18s} {'MB':>6s} " + " ".join(f"{k:>13s}" for k in COLUMNS) + "  remote/echo  stats/goal"


def _format(row: dict[str, Any]) -> str:
    ms = row["ms"]
    cells = " ".join(f"{ms[k]:13.3f}" for k in COLUMNS)
    goal = row["stats_vs_goal"]
    return f"{row['case']:18s} {row['x_bytes'] / 1e6:6.2f} {cells}  {ms['remote'] / ms['echo']:11.2f}  {goal:10.2f}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows[0]["ms"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(rows))], [r["ms"][name] for r in rows], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["case"] for r in rows])
    ax.set(ylabel="ms per training step (median)", yscale="log", title="one batch norm layer, forward + backward")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke test")
    parser.add_argument("--depth-only", action="store_true", help="only the whole models (statistics mode)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per whole model (default 15, --quick 3)")
    parser.add_argument("--json", type=Path, default=OUT / "training.json")
    parser.add_argument("--plot", type=Path, default=OUT / "training.png")
    args = parser.parse_args(argv)
    children.exit_on_signals()  # SIGTERM unwinds: the servers it started stop
    torch.set_num_threads(os.cpu_count() or 1)
    with echo_server() as echo_target, normserve_server() as target:
        print(f"load average at the start: {os.getloadavg()}")
        print("\nms per SGD step of whole models in statistics mode, beside local torch (rounds alternate)\n")
        print(DEPTH_HEADER)
        rounds = args.rounds or (3 if args.quick else 15)
        depth = measure_depth(target, rounds, 2 if args.quick else 10, args.quick)
        rows = []
        if not args.depth_only:
            print(f"\nmedian ms per training step of one BatchNorm (float32); {RANKS} ranks split the batch\n")
            print(HEADER)
            echo = Echo(echo_target)
            rows = measure(target, echo, 10 if args.quick else 200)
            echo.channel.close()
        print(f"load average at the end: {os.getloadavg()}")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
        "depth": depth,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    if rows:
        plot(rows, args.plot)
    print(f"wrote {args.json}" + (f" and {args.plot}" if rows else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
