"""A small data-parallel training job, run by ``torchrun --nproc_per_node 2`` (tests/test_training_jobs.py).

DistributedDataParallel (gloo, CPU, its defaults: ``broadcast_buffers=True``) over a ResNet-style model
converted to synchronized remote batch norms, one copy in each mode. Rank 0 checkpoints after every step
(the models' and optimizers' state_dicts); a run that finds a checkpoint resumes from it, with the same
command. ``--hold-file`` (holding a step number) makes the ranks stop in the middle of that step, after
its forward, for the test to kill them there. At the end, the ranks desynchronize on purpose and realign.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from normserve.client import Aborted, NormClient
from normserve.client.torch import MODES, convert_to_remote, realign_sync_steps

PER_RANK, CLASSES = 3, 4


class Block(nn.Module):
    """A residual block: conv, batch norm, ReLU, conv, batch norm, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet() -> nn.Module:
    """The job's model with torch layers, the same in every process."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        Block(6),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, CLASSES),
    )


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)


def batch(step: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s whole batch (every rank's part, rank 0's first), the same in every process."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(world_size * PER_RANK, 3, 5, 5, generator=generator) * 2 + 0.5
    return x, torch.randint(0, CLASSES, (world_size * PER_RANK,), generator=generator)


def _hold(hold_file: Path, step: int, out: Path, rank: int) -> None:
    """Stop here (the test kills this process) when ``hold_file`` names ``step``; ends with the parent."""
    if not hold_file.exists() or hold_file.read_text().strip() != str(step):
        return
    parent = os.getppid()
    (out / f"holding.{rank}.tmp").write_text(str(os.getpid()))
    os.replace(out / f"holding.{rank}.tmp", out / f"holding.{rank}")  # whole: the test reads the pid
    while os.getppid() == parent:
        time.sleep(0.05)
    raise SystemExit("torchrun went away")


def desynchronize_and_realign(nc: NormClient, rank: int) -> str:
    """Rank 0 runs one training forward more than rank 1 (a validation pass left in train mode): the next step
    fails at once on both ranks, naming their steps; realign_sync_steps, and the ranks train on together.
    Returns the failure's message."""
    model = convert_to_remote(nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)), nc, process_group="world")
    x = torch.randn(4, 3, requires_grad=True)
    model(x).sum().backward()
    if rank == 0:
        with torch.no_grad():
            model(x)
    try:
        model(x).sum().backward()
    except Aborted as error:
        failure = error.details
    else:
        raise AssertionError("a desynchronized step did not fail")
    realign_sync_steps(model)
    model(x).sum().backward()
    return failure


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--hold-file", type=Path)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    checkpoint = args.out / "checkpoint.pt"
    resuming = checkpoint.exists()
    with NormClient(args.target) as nc:
        # A resumed run continues from its checkpoint: adopt the layers of the earlier attempt (whatever state
        # it left them in), then load_state_dict writes the checkpoint's state to the server.
        existing = "adopt" if resuming else "refuse"
        models = {
            mode: convert_to_remote(
                resnet(), nc, prefix=f"{args.prefix}.{mode}.", process_group="world", mode=mode, existing=existing
            )
            for mode in MODES
        }
        optimizers = {mode: optimizer(model) for mode, model in models.items()}
        start, losses = 0, {mode: [] for mode in MODES}
        if resuming:
            saved = torch.load(checkpoint)
            for mode in MODES:
                models[mode].load_state_dict(saved["models"][mode])
                optimizers[mode].load_state_dict(saved["optimizers"][mode])
            start, losses = saved["step"], saved["losses"]
        parallel = {mode: DistributedDataParallel(model) for mode, model in models.items()}
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for step in range(start, args.steps):
            x, target = batch(step, world_size)
            for mode in MODES:
                optimizers[mode].zero_grad()
                y = parallel[mode](x[mine])
                if args.hold_file is not None:
                    _hold(args.hold_file, step, args.out, rank)
                loss = nn.functional.cross_entropy(y, target[mine])
                loss.backward()
                optimizers[mode].step()
                whole = loss.detach().clone()
                dist.all_reduce(whole)
                losses[mode].append(whole.item() / world_size)
            if rank == 0:
                saved = {
                    "step": step + 1,
                    "models": {mode: model.state_dict() for mode, model in models.items()},
                    "optimizers": {mode: o.state_dict() for mode, o in optimizers.items()},
                    "losses": losses,
                }
                torch.save(saved, args.out / "checkpoint.tmp")
                os.replace(args.out / "checkpoint.tmp", checkpoint)
        desynchronized = desynchronize_and_realign(nc, rank)
        if rank == 0:
            result = {
                "desynchronized": desynchronized,
                "losses": losses,
                "state": {
                    mode: {k: v.tolist() for k, v in model.state_dict().items()} for mode, model in models.items()
                },
            }
            (args.out / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
