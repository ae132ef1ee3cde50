"""What the pieces of a training job cost with a converted model (docs/pytorch.md, "Training jobs").

A small ResNet-style model (5 batch norms, batch 32 of 3 x 16 x 16), on a local server, each mode:
an eager training step; the same step compiled (torch.compile's default backend: its first step, and the
steady step after); and the job's other pieces: converting the model (alone, and with ``process_group=``
in a world of one: the broadcast of the group id), a deepcopy (an EMA copy), an EMA update of
``AveragedModel``, ``torch.save(model)``, and ``load_state_dict`` of a checkpoint (one SetState per layer).
Medians of repeated runs, in milliseconds.

    python benchmarks/training_jobs.py           # the table
    python benchmarks/training_jobs.py --quick   # few repeats (a smoke test)
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from normserve.client import NormClient
from normserve.client.torch import MODES, convert_to_remote
from normserve.tools.bench import normserve_server


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16), Block(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor) -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()


def _mode(nc: NormClient, mode: str, repeats: int) -> list[tuple[str, str, float]]:
    """The table's rows of one mode."""
    x, target = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
    rows = [
        (mode, "convert", _median_ms(lambda: convert_to_remote(resnet(), nc, mode=mode), repeats)),
        (
            mode,
            "convert, process_group=",
            _median_ms(lambda: convert_to_remote(resnet(), nc, mode=mode, process_group="world"), repeats),
        ),
    ]
    model = convert_to_remote(resnet(), nc, mode=mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rows.append((mode, "eager step", _median_ms(lambda: _step(model, optimizer, x, target), repeats)))
    compiled = torch.compile(model)
    start = time.perf_counter()
    _step(compiled, optimizer, x, target)
    rows.append((mode, "compiled: first step", 1e3 * (time.perf_counter() - start)))
    rows.append((mode, "compiled step", _median_ms(lambda: _step(compiled, optimizer, x, target), repeats)))
    rows.append((mode, "deepcopy (EMA copy)", _median_ms(lambda: copy.deepcopy(model), repeats)))
    averaged = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    rows.append((mode, "AveragedModel update", _median_ms(lambda: averaged.update_parameters(model), repeats)))
    rows.append((mode, "torch.save(model)", _median_ms(lambda: torch.save(model, io.BytesIO()), repeats)))
    state = model.state_dict()
    rows.append((mode, "load_state_dict", _median_ms(lambda: model.load_state_dict(state), repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 20
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/rendezvous", rank=0, world_size=1)
    with normserve_server() as address, NormClient(address) as nc:
        rows = [row for mode in MODES for row in _mode(nc, mode, repeats)]
    dist.destroy_process_group()
    print(f"{'mode':<11} {'what':<26} {'ms':>9}")
    for mode, what, ms in rows:
        print(f"{mode:<11} {what:<26} {ms:>9.2f}")


if __name__ == "__main__":
    main()
