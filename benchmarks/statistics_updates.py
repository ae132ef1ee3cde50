"""The server's time per statistics update (issue 27, goal 4), over the wire and in the server's own path.

A trainer in statistics mode sends its batch norms' updates on one PushStatistics stream, one message in
flight. This measures what one update costs the server:

- **wire**: a real ``normserve serve`` (default ``--sync full``), one stream, messages of N updates to
  distinct 512-channel batch norms, each answered before the next is sent, beside a bare gRPC echo of
  the same request and answer bytes in alternating rounds. (message - echo) / N is the server's time
  per update, transport excluded.
- **parts**: the same messages in-process, on the server's own objects: decoding and checking the
  updates, ``Registry.push_statistics`` (the layer math and the stored transaction), and the SQLite
  transaction alone.

    python benchmarks/statistics_updates.py           # table + benchmarks/out/statistics_updates.json
    python benchmarks/statistics_updates.py --quick   # few rounds (a smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from normserve.client import NormClient, protocol
from normserve.server.registry import Registry
from normserve.server.servicer import Limits, NormalizationServicer
from normserve.server.store import StateStore, StateUpdate
from normserve.tools import children
from normserve.tools.bench import Echo, echo_server, normserve_server, quartiles
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

OUT = Path(__file__).parent / "out"
CHANNELS = 512
BATCH = 32 * 16 * 16  # values behind each channel's statistics: a 32x512x16x16 batch


def _message(sequence: int, layers: list[str], rng: np.random.Generator) -> pb.PushStatisticsRequest:
    updates = [
        protocol.statistics_update(
            name, sequence, BATCH, rng.normal(size=CHANNELS), rng.uniform(0.5, 2.0, CHANNELS) * BATCH, None
        )
        for name in layers
    ]
    return pb.PushStatisticsRequest(sequence=sequence, updates=updates)


def measure_wire(target: str, echo: Echo, per_message: int, rounds: int) -> dict[str, Any]:
    """ms per message on one PushStatistics stream and for the echo of its bytes, alternating."""
    layers = [f"bn{j}" for j in range(per_message)]
    with NormClient(target) as client:
        for name in layers:
            client.create_layer(name, "batch_norm", num_features=CHANNELS)
    rng = np.random.default_rng(0)
    messages = [_message(i + 1, layers, rng) for i in range(rounds + 1)]
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
    requests: queue.Queue = queue.Queue()
    answers = pb_grpc.NormalizationStub(channel).PushStatistics(iter(requests.get, None))
    push, bare = [], []
    request_bytes = messages[0].ByteSize()
    answer_bytes = 0
    for message in messages:
        start = time.perf_counter()
        requests.put(message)
        answer = next(answers)
        push.append(time.perf_counter() - start)
        if any(outcome.code for outcome in answer.outcomes):
            raise RuntimeError(f"an update was refused: {answer.outcomes[0].message}")
        answer_bytes = answer.ByteSize()
        start = time.perf_counter()
        echo.unary(request_bytes, answer_bytes)
        bare.append(time.perf_counter() - start)
    requests.put(None)
    channel.close()
    push_ms, echo_ms = [t * 1e3 for t in push[1:]], [t * 1e3 for t in bare[1:]]
    server = [(p - e) / per_message for p, e in zip(push_ms, echo_ms, strict=True)]
    return {
        "updates per message": per_message,
        "request bytes": request_bytes,
        "answer bytes": answer_bytes,
        "message ms": quartiles(push_ms),
        "echo ms": quartiles(echo_ms),
        "server ms per update": quartiles(server),
    }


def measure_parts(per_message: int, rounds: int, sync: str = "FULL") -> dict[str, Any]:
    """ms per update of each part of the server's path, in-process (no transport, no event loop wait)."""
    layers = [f"bn{j}" for j in range(per_message)]
    rng = np.random.default_rng(1)

    async def scenario(directory: str) -> dict[str, Any]:
        store = StateStore(directory, synchronous=sync)
        registry = Registry(store, default_device="cpu", workers=1)
        for name in layers:
            await registry.create(name, pb.LayerConfig(kind=pb.BATCH_NORM, num_features=CHANNELS))
        servicer = NormalizationServicer(registry, Limits())
        message = _message(1, layers, rng)

        async def decode() -> list[Any]:
            return [await servicer._statistics_update(u, "updates") for u in message.updates]

        decoded = await decode()
        times: dict[str, list[float]] = {"decode": [], "push_statistics": [], "store": []}
        state = {k: rng.normal(size=CHANNELS).astype(np.float32) for k in ("running_mean", "running_var")}
        for name in layers:  # the store alone writes layers of its own
            store.create_layer(f"s{name}", b"", 1, 0, {**state, "weight": state["running_var"]})
        for version in range(2, rounds + 3):
            start = time.perf_counter()
            await decode()
            times["decode"].append(time.perf_counter() - start)
            start = time.perf_counter()
            await registry.push_statistics(decoded)
            times["push_statistics"].append(time.perf_counter() - start)
            writes = [StateUpdate(f"s{name}", version, 1, state) for name in layers]
            start = time.perf_counter()
            store.update_states(writes)
            times["store"].append(time.perf_counter() - start)
        await registry.close()
        return {part: quartiles([t * 1e3 / per_message for t in values[1:]]) for part, values in times.items()}

    with tempfile.TemporaryDirectory() as directory:
        return {"updates per message": per_message, "sync": sync, **asyncio.run(scenario(directory))}


def _cell(q: dict[str, float]) -> str:
    return f"{q['median']:.3f} ({q['q1']:.3f}-{q['q3']:.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke test")
    parser.add_argument("--json", type=Path, default=OUT / "statistics_updates.json")
    args = parser.parse_args(argv)
    children.exit_on_signals()
    rounds = 10 if args.quick else 200
    print(f"load average at the start: {os.getloadavg()}")
    report: dict[str, Any] = {"channels": CHANNELS, "wire": [], "parts": []}
    with echo_server() as echo_target, normserve_server() as target:
        echo = Echo(echo_target)
        print("\nover the wire (--sync full), ms: median (q1-q3)")
        print("| updates/message | message ms | echo ms | server ms per update |\n|---:|---:|---:|---:|")
        for per_message in (1, 20):
            row = measure_wire(target, echo, per_message, rounds)
            report["wire"].append(row)
            print(
                f"| {per_message} | {_cell(row['message ms'])} | {_cell(row['echo ms'])} | "
                f"**{_cell(row['server ms per update'])}** |"
            )
        echo.channel.close()
    print("\nin-process parts, ms per update: median (q1-q3)")
    print(
        "| updates/message | sync | decode | push_statistics (math + store) | store alone |\n|---:|---|---:|---:|---:|"
    )
    for per_message, sync in ((20, "FULL"), (20, "NORMAL"), (1, "FULL")):
        row = measure_parts(per_message, rounds, sync)
        report["parts"].append(row)
        print(
            f"| {per_message} | {sync} | {_cell(row['decode'])} | {_cell(row['push_statistics'])} | "
            f"{_cell(row['store'])} |"
        )
    print(f"load average at the end: {os.getloadavg()}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
