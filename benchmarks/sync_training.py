"""Synchronized batch norm in data-parallel CPU training: normserve against a gloo all-reduce peer (issue 27).

A ResNet-18-shaped CNN (``training.resnet_shaped(_Basic, (2, 2, 2, 2), width)``: 20 batch norms; width 32
by default, batch 8 of 3 x 32 x 32 per rank) is trained with SGD by 2 and then 4 ranks, real processes
(this script once per rank, started through ``normserve.tools.children.popen`` so that they end with it;
gloo backend, a file rendezvous), each rank its own data. Every rank builds three variants of the
same model, all wrapped in DistributedDataParallel with its defaults (gradients all-reduced over gloo,
buffers broadcast from rank 0 before each forward):

* ``peer``: what a CPU user writes, since torch.nn.SyncBatchNorm refuses CPU tensors: a batch norm whose
  training forward all-reduces (count, sum, sum of squares) per channel over gloo and normalizes with the
  global statistics (running statistics updated as torch's SyncBatchNorm does), and whose backward
  all-reduces the two backward sums (sum dy, sum dy * xhat): :class:`PeerSyncBatchNorm2d`;
* ``ddp``: plain DDP, torch's unsynchronized BatchNorm2d (each rank normalizes with its own batch);
* ``normserve``: ``convert_to_remote(model, client, process_group="world", mode="statistics")`` against one
  local normserve server the benchmark starts (one TrainStatistics call per batch norm forward, one
  GradientStatistics per backward).

Rounds alternate the variants (the order rotating every round); a round is ``--steps`` SGD steps after a
barrier, and its ms per step is the slowest rank's. Reported: median and quartiles over the rounds, the
per-round ratios normserve/peer and ddp/peer, the time each rank spends in the synchronized layers'
exchanges (the peer's all-reduces, normserve's two calls), each rank's CPU time per step, and the server's.
Before timing, peer and normserve train two steps in lockstep on the same data; their running statistics
(the second forward's depend on the first backward's exchange) and losses must agree to 1e-4 (asserted, and
printed; see TOLERANCE).

Each rank runs ``max(1, cores // ranks)`` torch threads; on a machine with fewer cores than ranks (+ the
server) the ranks oversubscribe it, which the output says.

    python benchmarks/sync_training.py           # the table + benchmarks/out/sync_training.json
    python benchmarks/sync_training.py --quick   # narrow model, few steps: a smoke test (well under a minute)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from training import _Basic, resnet_shaped

from normserve.client import NormClient
from normserve.client.torch import RemoteNorm, convert_to_remote
from normserve.tools import children
from normserve.tools.bench import normserve_server, quartiles

OUT = Path(__file__).parent / "out"
VARIANTS = ("peer", "ddp", "normserve")
WORLDS = (2, 4)


@dataclass(frozen=True)
class Config:
    width: int = 32
    batch: int = 8  # per rank
    side: int = 32
    rounds: int = 12
    steps: int = 5  # per round
    check_steps: int = 2  # peer and normserve in lockstep before the numerics check (also their warm-up)
    timeout_s: float = 1800.0  # a whole world's run, from spawning to the last result


# ---------------------------------------------------------------------- where the exchanges' time goes
@dataclass
class _Clock:
    """Seconds spent in a variant's synchronized exchanges (all ranks wait in them for the slowest)."""

    seconds: dict[str, float] = field(default_factory=lambda: {"forward": 0.0, "backward": 0.0})
    calls: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    def timed(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
                self.calls[phase] += 1

        return call

    def reset(self) -> None:
        self.seconds = {phase: 0.0 for phase in self.seconds}
        self.calls = {phase: 0 for phase in self.calls}


# ---------------------------------------------------------------------- the peer: batch norm over gloo
def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


class _PeerSync(torch.autograd.Function):
    """SyncBatchNorm's math on CPU: one all-reduce of the statistics forward, one of the two sums backward."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, module: PeerSyncBatchNorm2d
    ) -> torch.Tensor:
        dims, channels = [0, *range(2, x.dim())], x.shape[1]
        # Float32 sums (a fast pass each; var_mean is much slower on CPU), combined in float64.
        local = torch.cat([x.new_tensor([x.numel() // channels]), x.sum(dims), (x * x).sum(dims)]).double()
        total = module.clock.timed("forward", _all_reduce)(local)
        count, mean = total[0], total[1 : 1 + channels] / total[0]
        var = (total[1 + channels :] / count - mean * mean).clamp_min(0)
        with torch.no_grad():  # as torch's SyncBatchNorm: the unbiased variance of the whole step's batch
            module.num_batches_tracked.add_(1)
            factor = 1.0 / float(module.num_batches_tracked) if module.momentum is None else module.momentum
            module.running_mean.lerp_(mean.to(x.dtype), factor)
            module.running_var.lerp_((var * count / (count - 1)).to(x.dtype), factor)
        mean32, invstd = mean.to(x.dtype), torch.rsqrt(var + module.eps).to(x.dtype)
        ctx.save_for_backward(x, weight, mean32, invstd)
        ctx.count, ctx.module = float(count), module
        # The global statistics as "running" ones: torch's eval kernel normalizes in one pass.
        return nn.functional.batch_norm(x, mean32, var.to(x.dtype), weight, bias, False, 0.0, module.eps)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        dy = dy.contiguous()
        # torch's fused backward reduction, parameter gradients only: sum(dy * xhat) and sum(dy), one pass.
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, None, None, mean, invstd, True, ctx.module.eps, [False, True, True]
        )
        sums = ctx.module.clock.timed("backward", _all_reduce)(torch.cat([sum_dy, sum_dy_xhat]))
        mean_dy, mean_dy_xhat = (sums / ctx.count).chunk(2)
        # dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) is per channel a * dy + b * (x - mean) + c,
        # x centred first (b * x + c' would cancel digits where |mean| >> std): torch's eval kernel, one pass.
        a = weight * invstd
        b, c = -a * invstd * mean_dy_xhat, -a * mean_dy
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dx = nn.functional.batch_norm(x, mean, torch.ones_like(mean), b, c, False, 0.0, 0.0).add_(dy * a.view(shape))
        return dx, sum_dy_xhat, sum_dy, None  # this rank's own parameter gradients: DDP averages them


class PeerSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training forward and backward are synchronized over the default process group."""

    def __init__(self, *args: Any, clock: _Clock, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.affine or not self.track_running_stats:
            return super().forward(x)  # eval: the running statistics, no exchange (the benchmark's BNs train)
        return _PeerSync.apply(x, self.weight, self.bias, self)


def convert_to_peer(model: nn.Module, clock: _Clock) -> nn.Module:
    """Swap every BatchNorm2d of ``model`` for a PeerSyncBatchNorm2d with the same state (as
    ``convert_sync_batchnorm`` does)."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            peer = PeerSyncBatchNorm2d(child.num_features, child.eps, child.momentum, clock=clock)
            peer.load_state_dict(child.state_dict())
            setattr(model, name, peer)
        else:
            convert_to_peer(child, clock)
    return model


# ---------------------------------------------------------------------- the server's side
#: The server's calls of a synchronized step (statistics mode), whose phases its metrics report.
SYNC_METHODS = ("TrainStatistics", "GradientStatistics")
_TOTALS = (
    "normserve_request_duration_seconds_count",
    "normserve_request_duration_seconds_sum",
    "normserve_request_phase_seconds_sum",
)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def _server_phases(url: str) -> dict[str, float]:
    """The server's totals so far, from its Prometheus text: per method of SYNC_METHODS, ``calls``,
    ``seconds`` (arrival to answer) and each phase's seconds (queue, compute, store, sync: server/phases.py)."""
    totals: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name not in _TOTALS:
            continue
        labels_text, _, value = rest.rpartition("} ")
        labels = dict(_LABEL.findall(labels_text))
        if labels.get("method") not in SYNC_METHODS:
            continue
        what = labels.get("phase") or ("calls" if name.endswith("_count") else "seconds")
        key = f"{labels['method']}.{what}"
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------- one rank
def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its descendants so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                seconds += _cpu_seconds(int(child))
    return seconds


def _variants(config: Config, client: NormClient, clocks: dict[str, _Clock]) -> dict[str, nn.Module]:
    """The three DDP models, from the same initial weights (resnet_shaped seeds them)."""

    def make() -> nn.Module:
        return resnet_shaped(_Basic, (2, 2, 2, 2), config.width)

    remote = convert_to_remote(make(), client, process_group="world", mode="statistics")
    for module in remote.modules():
        if isinstance(module, RemoteNorm):  # time the exchanges on the module's own layer handle
            layer = module._layer
            layer.train_statistics = clocks["normserve"].timed("forward", layer.train_statistics)
            layer.gradient_statistics = clocks["normserve"].timed("backward", layer.gradient_statistics)
    models = {"peer": convert_to_peer(make(), clocks["peer"]), "ddp": make(), "normserve": remote}
    return {name: DistributedDataParallel(models[name]) for name in VARIANTS}


def _stepper(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _running_stats(model: nn.Module) -> list[torch.Tensor]:
    return [
        tensor.detach().clone()
        for module in model.modules()
        if isinstance(module, nn.BatchNorm2d | RemoteNorm)
        for tensor in (module.running_mean, module.running_var)
    ]


#: The numerics check's tolerance, relative to each tensor's largest magnitude. The two differ by float32
#: rounding (summation orders; the peer's variance from sums of squares), which the network amplifies from step
#: to step (a ReLU whose input is within rounding of 0 passes a gradient in one and not the other): after 2
#: steps about 2e-5 at width 32 and 4 ranks, 3e-4 after 3. A backward without its exchange is off by 0.1.
TOLERANCE = 1e-4


def _check_numerics(steps: dict[str, Callable[[], float]], models: dict[str, nn.Module], count: int) -> dict:
    """``count`` steps of peer and normserve in lockstep on the same data; their running statistics (and
    losses) must agree to TOLERANCE (float32 rounding, amplified by the steps)."""
    losses = {name: [steps[name]() for _ in range(count)] for name in ("peer", "normserve")}
    peer, remote = _running_stats(models["peer"]), _running_stats(models["normserve"])
    assert len(peer) == len(remote) == 40, (len(peer), len(remote))
    worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(peer, remote, strict=True))
    assert worst <= TOLERANCE, f"running statistics differ by {worst:.2e} of their largest value"
    torch.testing.assert_close(torch.tensor(losses["peer"]), torch.tensor(losses["normserve"]), rtol=TOLERANCE, atol=0)
    return {"steps": count, "max_relative_difference": worst, "losses": losses}


@dataclass(frozen=True)
class RankSpec:
    """What a rank process is told (as JSON on its command line, ``--rank-of``)."""

    rank: int
    world: int
    rendezvous: str  # torch.distributed's init_method
    target: str  # the normserve server
    server: int | None  # its pid (its CPU time, from /proc)
    metrics: str  # its Prometheus endpoint
    config: Config
    out: str  # where the rank writes its results (JSON)


def _rank(spec: RankSpec) -> None:
    """One data-parallel rank: builds the variants, checks numerics, times alternating rounds."""
    rank, world, config, server, metrics = spec.rank, spec.world, spec.config, spec.server, spec.metrics
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # all ranks on this machine
    dist.init_process_group(
        "gloo", init_method=spec.rendezvous, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300)
    )
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
    x = torch.randn(config.batch, 3, config.side, config.side, generator=data)
    labels = torch.randint(0, 10, (config.batch,), generator=data)
    clocks = {name: _Clock() for name in VARIANTS}
    with NormClient(spec.target) as client:
        models = _variants(config, client, clocks)
        steps = {name: _stepper(model, x, labels) for name, model in models.items()}
        numerics = _check_numerics(steps, models, config.check_steps)
        steps["ddp"]()  # its warm-up; the others warmed up in the check
        for clock in clocks.values():
            clock.reset()
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
        phases: dict[str, float] = {}  # the server's, over the timed normserve rounds (rank 0 reads them)
        for index in range(config.rounds):
            shift = index % len(VARIANTS)  # the order rotates: no variant always follows the same one
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                # Rank 0 reads the server's totals before the barrier: no rank's clock runs while it reads.
                before = _server_phases(metrics) if name == "normserve" and rank == 0 else {}
                dist.barrier()
                server_cpu = _cpu_seconds(server) if server and rank == 0 else 0.0
                cpu, start = time.process_time(), time.perf_counter()
                for _ in range(config.steps):
                    steps[name]()
                sample = {
                    "ms": (time.perf_counter() - start) * 1e3 / config.steps,
                    "cpu_ms": (time.process_time() - cpu) * 1e3 / config.steps,
                }
                if server and rank == 0:
                    sample["server_cpu_ms"] = (_cpu_seconds(server) - server_cpu) * 1e3 / config.steps
                samples[name].append(sample)
                if name == "normserve":  # after every rank's last call (the barrier), untimed
                    dist.barrier()
                    if rank == 0:
                        for key, value in _server_phases(metrics).items():
                            phases[key] = phases.get(key, 0.0) + value - before.get(key, 0.0)
        dist.barrier()
    clocks_seen = {n: asdict(c) for n, c in clocks.items()}
    result = {"samples": samples, "clocks": clocks_seen, "numerics": numerics, "server_phases": phases}
    Path(spec.out).write_text(json.dumps(result))
    dist.destroy_process_group()


# ---------------------------------------------------------------------- the benchmark
def _server_pid(before: set[int]) -> int | None:
    """The server's pid: the child of this process's main thread that was not there ``before``."""
    now = _children()
    new = now - before
    return next(iter(new)) if len(new) == 1 else None


def _children() -> set[int]:
    with contextlib.suppress(OSError):
        return {int(pid) for pid in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()}
    return set()


def _run_ranks(world: int, target: str, server: int | None, metrics: str, config: Config) -> list[dict[str, Any]]:
    """Run ``world`` rank processes (this script with ``--rank-of``) to the end; their results, by rank.

    Each is started through ``children.popen``: the kernel ends it when this process ends, however it ends,
    even while it still imports torch. When one fails (or the run outlives ``config.timeout_s``) the others,
    which would wait in a collective, are stopped and this raises.
    """
    with tempfile.TemporaryDirectory() as scratch:
        specs = [
            RankSpec(r, world, f"file://{scratch}/rendezvous", target, server, metrics, config, f"{scratch}/{r}.json")
            for r in range(world)
        ]
        command = [sys.executable, __file__, "--rank-of"]
        ranks = [children.popen([*command, json.dumps(asdict(spec))]) for spec in specs]
        try:
            deadline = time.monotonic() + config.timeout_s
            while any(process.poll() is None for process in ranks):
                failed = [process.returncode for process in ranks if process.returncode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    raise RuntimeError(f"{world} ranks: a rank failed (exit codes {failed}) or timed out")
                time.sleep(0.2)
            failed = [process.returncode for process in ranks if process.returncode]
            if failed:
                raise RuntimeError(f"{world} ranks: a rank failed (exit codes {failed})")
            return [json.loads(Path(spec.out).read_text()) for spec in specs]
        finally:
            for process in ranks:
                if process.poll() is None:
                    process.terminate()
            for process in ranks:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _summary(world: int, results: list[dict[str, Any]], config: Config) -> dict[str, Any]:
    """Per variant: ms per step (the slowest rank's, each round), ratios to the peer in the same round,
    exchange time per step and per exchange (mean over ranks), CPU per step (mean over ranks), server CPU."""
    rounds = len(results[0]["samples"]["peer"])
    ms = {n: [max(r["samples"][n][i]["ms"] for r in results) for i in range(rounds)] for n in VARIANTS}
    timed_steps = rounds * config.steps
    row: dict[str, Any] = {"ranks": world, "variants": {}}
    for name in VARIANTS:
        clocks = [r["clocks"][name] for r in results]
        exchanges = {}
        for phase in ("forward", "backward"):
            seconds = statistics.fmean(c["seconds"][phase] for c in clocks)
            calls = statistics.fmean(c["calls"][phase] for c in clocks)
            exchanges[phase] = {
                "per_step": calls / timed_steps,
                "ms_per_step": seconds * 1e3 / timed_steps,
                "ms_per_exchange": seconds * 1e3 / calls if calls else None,
            }
        server = [s["server_cpu_ms"] for s in results[0]["samples"][name] if "server_cpu_ms" in s]
        row["variants"][name] = {
            "ms": quartiles(ms[name]),
            "per_round_ms": ms[name],
            "vs_peer": quartiles([v / p for v, p in zip(ms[name], ms["peer"], strict=True)]),
            "rank_cpu_ms": statistics.fmean(s["cpu_ms"] for r in results for s in r["samples"][name]),
            "server_cpu_ms": statistics.fmean(server) if server else None,
            "exchanges": exchanges,
        }
    phases = results[0]["server_phases"]
    row["server_calls"] = {
        method: {
            "calls_per_step": phases[f"{method}.calls"] / timed_steps,
            "ms_per_call": 1e3 * phases[f"{method}.seconds"] / phases[f"{method}.calls"],
            "phase_ms_per_call": {
                phase: 1e3 * phases.get(f"{method}.{phase}", 0.0) / phases[f"{method}.calls"]
                for phase in ("queue", "compute", "store", "sync")
            },
        }
        for method in SYNC_METHODS
        if phases.get(f"{method}.calls")
    }
    row["numerics"] = results[0]["numerics"]
    return row


HEADER = (
    f"{'ranks':>5s} {'variant':10s} {'ms/step (q1-q3)':>24s} {'/peer (q1-q3)':>20s} {'rank CPU':>9s} "
    f"{'server CPU':>10s} {'exch/step':>9s} {'exch ms/step':>12s} {'ms/exch fwd, bwd':>17s}"
)


def _format(row: dict[str, Any]) -> list[str]:
    def cell(q: dict[str, float], digits: int) -> str:
        return f"{q['median']:.{digits}f} ({q['q1']:.{digits}f}-{q['q3']:.{digits}f})"

    lines: list[str] = []
    calls: list[str] = []
    normserve = row["variants"]["normserve"]
    exchanges = zip(SYNC_METHODS, ("forward", "backward"), strict=True)
    client_ms = {method: normserve["exchanges"][phase]["ms_per_exchange"] for method, phase in exchanges}
    for method, call in row["server_calls"].items():
        spent = call["phase_ms_per_call"]
        parts = ", ".join(f"{phase} {ms:.2f}" for phase, ms in spent.items())
        parts += f", other {call['ms_per_call'] - sum(spent.values()):.2f}"  # decoding, answering, the event loop
        calls.append(
            f"      server {method}: {call['calls_per_step']:.0f} calls/step (all ranks), "
            f"{call['ms_per_call']:.2f} ms from arrival to answer ({parts}); "
            f"the rank waits {client_ms[method]:.2f} ms per call"
        )
    for name, v in row["variants"].items():
        forward, backward = v["exchanges"]["forward"], v["exchanges"]["backward"]
        count = forward["per_step"] + backward["per_step"]
        per = f"{forward['ms_per_exchange']:.2f}, {backward['ms_per_exchange']:.2f}" if count else "-"
        server = "-" if v["server_cpu_ms"] is None else f"{v['server_cpu_ms']:.1f}"
        lines.append(
            f"{row['ranks']:5d} {name:10s} {cell(v['ms'], 1):>24s} {cell(v['vs_peer'], 3):>20s} "
            f"{v['rank_cpu_ms']:9.1f} {server:>10s} {count:9.0f} "
            f"{forward['ms_per_step'] + backward['ms_per_step']:12.1f} {per:>17s}"
        )
    return lines + calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="narrow model, few steps: a smoke test")
    parser.add_argument("--width", type=int, help="the CNN's first stage's channels (default 32; --quick 8)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per world size (default 12; --quick 2)")
    parser.add_argument("--steps", type=int, help="SGD steps per round (default 5; --quick 2)")
    parser.add_argument("--json", type=Path, default=OUT / "sync_training.json")
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)  # a rank process: its RankSpec as JSON
    args = parser.parse_args(argv)
    if args.rank_of:
        given = json.loads(args.rank_of)
        _rank(RankSpec(**{**given, "config": Config(**given["config"])}))
        return 0
    base = Config(width=8, rounds=2, steps=2, check_steps=2) if args.quick else Config()
    given = {"width": args.width, "rounds": args.rounds, "steps": args.steps}
    config = Config(**{**asdict(base), **{k: v for k, v in given.items() if v is not None}})
    children.exit_on_signals()  # SIGTERM unwinds: the server and the ranks stop
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    print(f"load average at the start: {load_start}")
    print(
        f"ResNet-18-shaped CNN (20 batch norms), width {config.width}, batch {config.batch} of 3x{config.side}x"
        f"{config.side} per rank, SGD; {config.rounds} rounds of {config.steps} steps per variant; {cores} cores"
    )
    rows = []
    before = _children()
    metrics_port = _free_port()  # the server's phases per call come from its metrics
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    with normserve_server("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1") as target:
        server = _server_pid(before)
        for world in WORLDS:
            threads = max(1, cores // world)
            busy = world * threads + 1  # the ranks' torch threads, and the server
            note = f"oversubscribed: {busy} busy threads on {cores} cores" if busy > cores else "fits the cores"
            print(f"\n{world} ranks, {threads} torch thread(s) each ({note}); load {os.getloadavg()[0]:.2f}")
            start = time.perf_counter()
            row = _summary(world, _run_ranks(world, target, server, metrics, config), config)
            seconds = time.perf_counter() - start  # spawning and imports included
            row.update(
                threads_per_rank=threads, oversubscribed=busy > cores, load_after=os.getloadavg(), seconds=seconds
            )
            numerics = row["numerics"]
            print(
                f"numerics: after {numerics['steps']} steps the peer's and normserve's running statistics agree "
                f"to {numerics['max_relative_difference']:.1e} of each tensor's largest value (asserted <= "
                f"{TOLERANCE}), and so do the losses"
            )
            print(f"(ran {seconds:.0f} s, load after {row['load_after'][0]:.2f})")
            print(HEADER)
            print("\n".join(_format(row)), flush=True)
            rows.append(row)
    load_end = os.getloadavg()
    print(f"\nload average at the end: {load_end}")
    print(
        "ms/step: the slowest rank's per round; /peer: the same round's ratio; rank CPU: ms of CPU per step per"
        " rank; exch: the synchronized layers' exchanges per rank (peer: gloo all-reduces; normserve:"
        " TrainStatistics + GradientStatistics calls), waiting for the slowest rank included"
    )
    for row in rows:
        v = row["variants"]
        ratios = {name: v[name]["vs_peer"]["median"] for name in ("normserve", "ddp")}
        print(f"{row['ranks']} ranks: normserve/peer {ratios['normserve']:.3f}, ddp/peer {ratios['ddp']:.3f}")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": cores},
        "torch": torch.__version__,
        "config": asdict(config),
        "load_average": {"start": load_start, "end": load_end},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
