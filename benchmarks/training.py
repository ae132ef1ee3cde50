"""A training step of one batch norm layer through normserve.client.torch, against its peers in the same run.

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

    python benchmarks/training.py           # table + benchmarks/out/training.json + training.png
    python benchmarks/training.py --quick   # few repeats (a smoke test)
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
from normserve.client.torch import RemoteBatchNorm1d, RemoteBatchNorm2d
from normserve.tools import children
from normserve.tools.bench import Echo, alternate, echo_server, normserve_server

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
    parser.add_argument("--json", type=Path, default=OUT / "training.json")
    parser.add_argument("--plot", type=Path, default=OUT / "training.png")
    args = parser.parse_args(argv)
    children.exit_on_signals()  # SIGTERM unwinds: the servers it started stop
    torch.set_num_threads(os.cpu_count() or 1)
    with echo_server() as echo_target, normserve_server() as target:
        print(f"median ms per training step of one BatchNorm (float32); {RANKS} ranks split the batch\n")
        print(HEADER)
        echo = Echo(echo_target)
        rows = measure(target, echo, 10 if args.quick else 200)
        echo.channel.close()
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "torch": torch.__version__,
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
