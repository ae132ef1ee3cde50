"""Small tensor calls (issue 27, goal 5): a 4 KB Infer against a bare gRPC echo of the same bytes.

Each call below runs once per round, in alternating rounds, so that drift in
the machine's load hits all alike; every median is quoted with its quartiles
and as a ratio to the echo of that round. From the top, each row strips one
layer off what ``layer.infer`` does:

* ``layer.infer``: the client's method (plan, request encoding, answer checks, decoding);
* ``client.call``: the client's call path with a prebuilt request (retry loop, answer checks);
* ``raw callable``: the client's gRPC callable with the same request and metadata;
* ``GetLayer``, ``Health``: a call without tensors through the server's interceptors, and one that skips most;
* ``echo``: the bare grpc.aio echo server, raw bytes, no interceptors.

    python benchmarks/small_calls.py             # 2000 rounds, table + benchmarks/out/small_calls.json
    python benchmarks/small_calls.py --quick     # 200 rounds (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from normserve.client import NormClient
from normserve.tools import bench, children

OUT = Path(__file__).parent / "out"
NBYTES = 4096


def measure(target: str, echo_target: str, rounds: int) -> dict[str, Any]:
    x = np.random.default_rng(0).normal(size=(1, bench.CHANNELS, NBYTES // 4 // bench.CHANNELS)).astype(np.float32)
    echo = bench.Echo(echo_target)
    with NormClient(target) as nc:
        layer = nc.create_layer("small", "batch_norm", num_features=bench.CHANNELS)
        layer.train(x)
        request = layer._forward_request("Infer", x, None, None).message
        infer = nc._rpc("Infer")
        options = {"timeout": 60.0, "metadata": nc._call_metadata(request)}
        calls = {
            "layer.infer": lambda: layer.infer(x),
            "client.call": lambda: nc.call("Infer", request),
            "raw callable": lambda: infer(request, **options),
            "GetLayer": lambda: nc.layer("small"),
            "Health": lambda: nc.health(),
            "echo": lambda: echo.unary(NBYTES, NBYTES),
        }
        for call in calls.values():  # warm every path (channels, caches) before timing
            for _ in range(20):
                call()
        samples = bench.rounds(calls, rounds)
    ratios = {name: [a / b for a, b in zip(values, samples["echo"], strict=True)] for name, values in samples.items()}
    return {
        name: {
            "ms": {k: v * 1e3 for k, v in bench.quartiles(values).items()},
            "per_echo": bench.quartiles(ratios[name]),
        }
        for name, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 rounds instead of 2000")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=OUT / "small_calls.json")
    args = parser.parse_args()
    children.exit_on_signals()  # SIGTERM unwinds: the servers below stop
    rounds = args.rounds or (200 if args.quick else 2000)
    load = os.getloadavg()[0]
    with bench.echo_server() as echo_target, bench.normserve_server() as target:
        results = measure(target, echo_target, rounds)
    print(f"{rounds} alternating rounds, {NBYTES} B, load {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'call':<14} {'ms (q1-q3)':>22} {'/ echo (q1-q3)':>22}")
    for name, row in results.items():
        ms, ratio = row["ms"], row["per_echo"]
        print(
            f"{name:<14} {ms['median']:>8.3f} ({ms['q1']:.3f}-{ms['q3']:.3f}) "
            f"{ratio['median']:>8.2f} ({ratio['q1']:.2f}-{ratio['q3']:.2f})"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rounds": rounds, "bytes": NBYTES, "load": load, "calls": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
