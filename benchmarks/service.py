"""normserve over gRPC vs a bare grpc.aio echo of the same bytes, plus the store's write cost.

Two servers run as subprocesses on loopback: ``normserve serve`` and an echo
server (a grpc.aio generic handler that answers each request with as many
bytes as the normserve reply has). For every payload size the script times,
alternately, the NormClient call (Train, Infer, Gradient on a BatchNorm over
64 channels) and the echo of a request of the same size, and reports medians:

    ratio vs floor = normserve / (echo + the same kernel run locally)

1.0 would mean the service adds nothing to the wire floor and the math. It
also reports the SQLite write a Train commits (fsync'd with --sync full, and
with --sync normal).

    python benchmarks/service.py            # 4 KB .. 64 MB, table + benchmarks/out/service.json
    python benchmarks/service.py --quick    # 4 KB and 64 KB, few repeats (a smoke test)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

import normkernels as nk
from normserve.client import NormClient
from normserve.server.store import StateStore

CHANNELS = 64
SIZES = [(4 << 10, 300), (64 << 10, 200), (1 << 20, 40), (16 << 20, 8), (64 << 20, 4)]  # (bytes of x, repeats)
QUICK = [(4 << 10, 20), (64 << 10, 10)]
ECHO_METHOD = "/bench.Echo/Echo"
_OPTIONS = [("grpc.max_send_message_length", (1 << 31) - 1), ("grpc.max_receive_message_length", (1 << 31) - 1)]
NORMSERVE = str(Path(sys.executable).with_name("normserve"))


# ---------------------------------------------------------------------- echo server
async def _serve_echo() -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        (reply_bytes,) = struct.unpack_from("<Q", request)  # the client says how big the reply is
        return bytes(memoryview(request)[:reply_bytes]) if reply_bytes <= len(request) else bytes(reply_bytes)

    server = grpc.aio.server(options=_OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: raw bytes
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def _start(command: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = re.search(pattern, line)
        if match:
            return process, match.group(1)
    raise RuntimeError(f"{command[0]} did not start")


# ---------------------------------------------------------------------- timing
def _shape(nbytes: int) -> tuple[int, int, int]:
    elements = nbytes // 4
    length = 16 if elements < CHANNELS * 16 * 64 else 256
    return (elements // (CHANNELS * length), CHANNELS, length)


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: channel, plans, allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _alternate(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median ms of each function, timed in alternating rounds so drift hits all alike."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def measure_rpcs(target: str, echo_target: str, sizes: list[tuple[int, int]]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    with NormClient(target, timeout=600) as nc, grpc.insecure_channel(echo_target, options=_OPTIONS) as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        layer = nc.create_layer("bench.bn", "batch_norm", num_features=CHANNELS)
        local = nk.BatchNorm(CHANNELS)
        for nbytes, repeats in sizes:
            shape = _shape(nbytes)
            x = rng.normal(size=shape).astype(np.float32)
            dy = rng.normal(size=shape).astype(np.float32)
            calls = {  # op: (remote call, the same kernel locally, tensors sent, tensors returned)
                "Train": (lambda x=x: layer.train(x), lambda x=x: local.train_with_report(x), 1, 1),
                "Infer": (lambda x=x: layer.infer(x), lambda x=x: local.forward(x, training=False), 1, 1),
                "Gradient": (lambda x=x, dy=dy: layer.gradient(x, dy), lambda x=x, dy=dy: local.backward(x, dy), 2, 1),
            }
            for op, (remote, kernel, tensors_in, tensors_out) in calls.items():
                request = struct.pack("<Q", x.nbytes * tensors_out) + bytes(x.nbytes * tensors_in)
                times = _alternate({"normserve": remote, "echo": lambda req=request: echo(req)}, repeats)
                kernel_ms = _median_ms(kernel, max(3, repeats // 4))
                rows.append(
                    {
                        "op": op,
                        "x_bytes": x.nbytes,
                        "shape": list(shape),
                        "normserve_ms": times["normserve"],
                        "echo_ms": times["echo"],
                        "kernel_ms": kernel_ms,
                        "ratio_vs_echo": times["normserve"] / times["echo"],
                        "ratio_vs_floor": times["normserve"] / (times["echo"] + kernel_ms),
                        "normserve_MBps": x.nbytes * (tensors_in + tensors_out) / times["normserve"] / 1e3,
                        "echo_MBps": x.nbytes * (tensors_in + tensors_out) / times["echo"] / 1e3,
                    }
                )
                print(_format_row(rows[-1]), flush=True)
    return rows


def measure_store_writes(repeats: int) -> dict[str, float]:
    """Median ms of the SQLite transaction a Train of a 64-channel BatchNorm commits."""
    rng = np.random.default_rng(1)
    state = {k: rng.normal(size=CHANNELS).astype(np.float32) for k in ("running_mean", "running_var")}
    result = {}
    for mode in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory() as directory:
            store = StateStore(directory, synchronous=mode)
            store.create_layer(
                "bn", b"", 1, 0, {**state, "weight": state["running_var"], "bias": state["running_mean"]}
            )
            versions = iter(range(2, 10**9))
            write = lambda store=store, versions=versions: store.update_state("bn", next(versions), 1, state)  # noqa: E731
            result[mode.lower()] = _median_ms(write, repeats)
            store.close()
    return result


def _format_row(row: dict) -> str:
    size = row["x_bytes"]
    label = f"{size >> 20} MB" if size >= 1 << 20 else f"{size >> 10} KB"
    return (
        f"| {row['op']:<8} | {label:>6} | {row['normserve_ms']:9.3f} | {row['echo_ms']:9.3f} | "
        f"{row['kernel_ms']:9.3f} | {row['ratio_vs_echo']:6.2f} | {row['ratio_vs_floor']:6.2f} | "
        f"{row['normserve_MBps']:8.0f} | {row['echo_MBps']:8.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small payloads, few repeats")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "service.json")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        asyncio.run(_serve_echo())
        return

    with tempfile.TemporaryDirectory() as state_dir:
        server, target = _start(
            [NORMSERVE, "serve", "--port", "0", "--state-dir", state_dir], r"listening on (127\.0\.0\.1:\d+)"
        )
        echo, echo_target = _start([sys.executable, __file__, "--serve-echo"], r"listening on (127\.0\.0\.1:\d+)")
        try:
            print(f"normserve {target} vs echo {echo_target}; x is (N, {CHANNELS}, L) float32\n")
            print("| op       |   size |  ours ms |   echo ms | kernel ms | /echo  | /floor |  ours MB/s | echo MB/s |")
            print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            rows = measure_rpcs(target, echo_target, QUICK if args.quick else SIZES)
        finally:
            for process in (server, echo):
                process.terminate()
                process.wait(60)
    writes = measure_store_writes(20 if args.quick else 300)
    print(
        f"\nSQLite write per Train (64 channels): {writes['full']:.3f} ms fsync'd (--sync full), "
        f"{writes['normal']:.3f} ms (--sync normal)"
    )
    floor = statistics.median(row["ratio_vs_floor"] for row in rows)
    print(f"median ratio vs floor (echo + local kernel): {floor:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "grpc": grpc.__version__,
        "rows": rows,
        "store_write_ms": writes,
        "median_ratio_vs_floor": floor,
    }
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
