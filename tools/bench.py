"""``normserve bench``: the service against a bare grpc.aio echo of the same bytes, in the same run.

For each op (Train, Infer, Gradient on a BatchNorm over 64 channels) and
payload size it times, in alternating rounds, the NormClient call over each
transport and the echo of the same bytes:

    bytes    the tensors inside one message (zero-copy encoding)
    stream   the streaming RPC, 1 MiB chunks
    shm      x and the output in a shared-memory region (server on this host, --shared-memory)
    echo     a unary grpc.aio echo answering with the reply's size; echo-stream: the same in 1 MiB chunks

and reports medians and ``ratio = ours / (echo + the same kernel run locally)``
(1.0: the service adds nothing to the wire floor and the math). "auto" is
what a client does by default (bytes below its stream threshold, stream
above). Then 8 concurrent clients: calls per second against the echo's.
Writes JSON and a PNG (latency vs payload, log axes).

Without ``--target`` it starts ``normserve serve`` and the echo itself; with
one, the echo still runs here, so the ratios mean something only when the
target is on this host too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from normserve.client import NormClient, NormServeError
from normserve.client.protocol import DEFAULT_STREAM_THRESHOLD
from normserve.tools import children

__all__ = [
    "Echo",
    "alternate",
    "echo_server",
    "main",
    "normserve_server",
    "quartiles",
    "rounds",
    "running",
    "start_process",
]

CHANNELS = 64
#: Where `normserve bench` writes its report when not told: one folder, named for it (and ignored by git here).
OUTPUT = Path("normserve-bench")
CHUNK = 1 << 20
SIZES = [(4 << 10, 300), (64 << 10, 150), (1 << 20, 40), (4 << 20, 16), (16 << 20, 8), (64 << 20, 4)]
QUICK = [(4 << 10, 20), (64 << 10, 10)]
OPS = {"Train": (1, 1), "Infer": (1, 1), "Gradient": (2, 1)}  # tensors sent, tensors returned
CONCURRENT_CLIENTS = 8
ECHO_SERVICE = "bench.Echo"
_OPTIONS = [("grpc.max_send_message_length", (1 << 31) - 1), ("grpc.max_receive_message_length", (1 << 31) - 1)]


# ---------------------------------------------------------------------- echo server
async def _serve_echo() -> None:
    def reply_size(request: bytes) -> int:
        return struct.unpack_from("<Q", request)[0]  # the client says how big the reply is

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        size = reply_size(request)
        return bytes(memoryview(request)[:size]) if size <= len(request) else bytes(size)

    async def echo_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        size = None
        async for chunk in requests:
            size = reply_size(chunk) if size is None else size
        reply = bytes(min(size, CHUNK))
        for start in range(0, size, CHUNK):
            yield reply[: min(CHUNK, size - start)]

    server = grpc.aio.server(options=_OPTIONS)
    handlers = {  # no (de)serializers: raw bytes
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"echo listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def start_process(command: list[str], pattern: str) -> tuple[subprocess.Popen, str]:
    """Start ``command`` and read its output until ``pattern`` matches; (the process, group 1 of the match).

    The rest of its output is read (and dropped) on a thread, so a chatty process never blocks on a full pipe.
    """
    process = children.popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        match = re.search(pattern, line)
        if match:
            threading.Thread(target=process.stdout.read, daemon=True).start()
            return process, match.group(1)
    raise RuntimeError(f"{command[0]} did not start")


@contextlib.contextmanager
def running(command: list[str], pattern: str) -> Iterator[str]:
    """``command`` running for the block (terminated after it); yields what ``pattern``'s group 1 matched."""
    process, address = start_process(command, pattern)
    try:
        yield address
    finally:
        process.terminate()
        process.wait(60)


def echo_server() -> contextlib.AbstractContextManager[str]:
    """The bare echo server for the block; yields its address."""
    return running([sys.executable, "-m", "normserve.tools.bench", "--serve-echo"], r"listening on (\S+:\d+)")


@contextlib.contextmanager
def normserve_server(*args: str) -> Iterator[str]:
    """``normserve serve --port 0`` on a scratch state folder for the block; yields its address."""
    with tempfile.TemporaryDirectory() as state_dir:
        command = [sys.executable, "-m", "normserve.tools", "serve", "--port", "0", "--state-dir", state_dir, *args]
        with running(command, r"ready: SERVING on (\S+:\d+) ") as target:  # listening, and its kernels warm
            yield target


class Echo:
    """Calls of the echo server: ``unary(sent, returned)`` and ``stream(sent, returned)`` in bytes."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=_OPTIONS)
        self._unary = self.channel.unary_unary(f"/{ECHO_SERVICE}/Echo")
        self._stream = self.channel.stream_stream(f"/{ECHO_SERVICE}/EchoStream")
        self._requests: dict[tuple[int, int], bytes] = {}

    def _request(self, sent: int, returned: int) -> bytes:
        key = (sent, returned)
        if key not in self._requests:  # prebuilt: the echo pays no encoding at all
            self._requests[key] = struct.pack("<Q", returned) + bytes(max(0, sent - 8))
        return self._requests[key]

    def unary(self, sent: int, returned: int) -> None:
        self._unary(self._request(sent, returned))

    def stream(self, sent: int, returned: int) -> None:
        request = memoryview(self._request(sent, returned))
        chunks = (bytes(request[i : i + CHUNK]) for i in range(0, len(request), CHUNK))
        for _ in self._stream(chunks):
            pass


# ---------------------------------------------------------------------- timing
def _shape(nbytes: int) -> tuple[int, int, int]:
    elements = nbytes // 4
    length = 16 if elements < CHANNELS * 16 * 64 else 256
    return (elements // (CHANNELS * length), CHANNELS, length)


def rounds(
    fns: dict[str, Callable[[], Any]], repeats: int, tick: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Seconds of each call of each function, timed in ``repeats`` alternating rounds (``tick`` after each)
    so that drift in the machine's load hits all alike; each function is called once first, untimed."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        tick()
    return samples


def alternate(fns: dict[str, Callable[[], Any]], repeats: int, tick: Callable[[], None]) -> dict[str, float]:
    """Median ms of each function, timed in alternating rounds (:func:`rounds`)."""
    return {name: statistics.median(values) * 1e3 for name, values in rounds(fns, repeats, tick).items()}


def quartiles(values: list[float]) -> dict[str, float]:
    """Median and quartiles of ``values`` (one value stands for all three)."""
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return {"median": median, "q1": q1, "q3": q3}


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _calls(layer: Any, op: str, x: np.ndarray, dy: np.ndarray, out: np.ndarray | None) -> Callable[[], Any]:
    if op == "Train":
        return lambda: layer.train(x, out=out)
    if op == "Infer":
        return lambda: layer.infer(x, out=out)
    return lambda: layer.gradient(x, dy, out=out)


def _kernel(op: str, x: np.ndarray, dy: np.ndarray) -> Callable[[], Any]:
    import normkernels as nk

    local = nk.BatchNorm(CHANNELS)
    return {
        "Train": lambda: local.train_with_report(x),
        "Infer": lambda: local.forward(x, training=False),
        "Gradient": lambda: local.backward(x, dy),
    }[op]


def measure_sizes(target: str, echo: Echo, sizes: list[tuple[int, int]], progress: Any) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    clients = {
        "bytes": NormClient(target, timeout=600, stream_threshold=1 << 62),
        "stream": NormClient(target, timeout=600, stream_threshold=0, chunk_bytes=CHUNK),
    }
    largest = max(size for size, _ in sizes)
    region = None
    try:
        region = clients["bytes"].create_shared_memory(f"bench-{os.getpid()}", 4 * largest + 4096)
    except NormServeError as error:
        print(f"shared memory not measured: {error}", file=sys.stderr)
    try:
        layers = {
            name: nc.create_layer("bench.bn", "batch_norm", num_features=CHANNELS) for name, nc in clients.items()
        }
        for nbytes, repeats in sizes:
            shape = _shape(nbytes)
            x, dy = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
            for op, (tensors_in, tensors_out) in OPS.items():
                fns = {name: _calls(layers[name], op, x, dy, None) for name in clients}
                if region is not None:  # the same three places in the region for every size
                    xs, dys, out = (region.array(shape, offset=i * x.nbytes) for i in range(3))
                    xs[...], dys[...] = x, dy
                    fns["shm"] = _calls(layers["bytes"], op, xs, dys, out)
                sent, returned = x.nbytes * tensors_in + 8, x.nbytes * tensors_out
                fns["echo"] = lambda s=sent, r=returned: echo.unary(s, r)
                fns["echo-stream"] = lambda s=sent, r=returned: echo.stream(s, r)
                times = alternate(fns, repeats, progress)
                kernel_ms = _median_ms(_kernel(op, x, dy), max(3, repeats // 4))
                floor = times["echo"] + kernel_ms
                times["auto"] = times["stream" if x.nbytes * tensors_in >= DEFAULT_STREAM_THRESHOLD else "bytes"]
                row = {"op": op, "x_bytes": x.nbytes, "shape": list(shape), "kernel_ms": kernel_ms, "ms": times}
                row["ratio_vs_floor"] = {k: v / floor for k, v in times.items() if not k.startswith("echo")}
                rows.append(row)
                progress.write(_format_row(row))
    finally:
        for nc in clients.values():
            nc.close()
    return rows


def measure_concurrency(target: str, echo_target: str, nbytes: int, seconds: float) -> dict[str, float]:
    """Calls per second of CONCURRENT_CLIENTS threads, each with its own channel: Infer vs echo."""
    x = np.random.default_rng(1).normal(size=_shape(nbytes)).astype(np.float32)

    def run(make: Callable[[], tuple[Callable[[], Any], Callable[[], None]]]) -> float:
        count = [0] * CONCURRENT_CLIENTS
        start = threading.Barrier(CONCURRENT_CLIENTS + 1)
        stop = time.perf_counter() + 1e9

        def worker(i: int) -> None:
            call, close = make()
            call()
            start.wait()
            while time.perf_counter() < stop:
                call()
                count[i] += 1
            close()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(CONCURRENT_CLIENTS)]
        for thread in threads:
            thread.start()
        start.wait()
        began = time.perf_counter()
        stop = began + seconds
        for thread in threads:
            thread.join()
        return sum(count) / (time.perf_counter() - began)

    def ours() -> tuple[Callable[[], Any], Callable[[], None]]:
        nc = NormClient(target, timeout=600)
        layer = nc.create_layer("bench.bn", "batch_norm", num_features=CHANNELS)
        return (lambda: layer.infer(x)), nc.close

    def theirs() -> tuple[Callable[[], Any], Callable[[], None]]:
        echo = Echo(echo_target)
        return (lambda: echo.unary(x.nbytes + 8, x.nbytes)), echo.channel.close

    echo_rate, ours_rate = run(theirs), run(ours)
    return {"x_bytes": x.nbytes, "normserve_calls_per_s": ours_rate, "echo_calls_per_s": echo_rate}


# ---------------------------------------------------------------------- reporting
def _label(nbytes: int) -> str:
    return f"{nbytes >> 20} MB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KB"


HEADER = (
    "| op | size | bytes ms | stream ms | shm ms | echo ms | echo-stream ms | kernel ms | auto /floor | shm /floor |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _format_row(row: dict) -> str:
    ms, ratio = row["ms"], row["ratio_vs_floor"]
    shm = f"{ms['shm']:.3f}" if "shm" in ms else "-"
    shm_ratio = f"{ratio['shm']:.2f}" if "shm" in ratio else "-"
    return (
        f"| {row['op']} | {_label(row['x_bytes'])} | {ms['bytes']:.3f} | {ms['stream']:.3f} | {shm} | "
        f"{ms['echo']:.3f} | {ms['echo-stream']:.3f} | {row['kernel_ms']:.3f} | {ratio['auto']:.2f} | {shm_ratio} |"
    )


def summarize(rows: list[dict], concurrency: list[dict]) -> dict[str, Any]:
    """The issue's goals as measured ratios."""
    small = [row for row in rows if row["x_bytes"] == min(r["x_bytes"] for r in rows)]
    summary: dict[str, Any] = {
        "worst_auto_ratio_vs_floor": max(row["ratio_vs_floor"]["auto"] for row in rows),
        "median_auto_ratio_vs_floor": statistics.median(row["ratio_vs_floor"]["auto"] for row in rows),
        "small_call_p50_vs_echo": {row["op"]: row["ms"]["auto"] / row["ms"]["echo"] for row in small},
        "concurrent_throughput_vs_echo": {
            _label(c["x_bytes"]): c["normserve_calls_per_s"] / c["echo_calls_per_s"] for c in concurrency
        },
    }
    shm_rows = [r for r in rows if r["op"] == "Infer" and "shm" in r["ms"]]
    if shm_rows:
        row = max(shm_rows, key=lambda r: r["x_bytes"])
        summary["shm_speedup_vs_bytes"] = {_label(row["x_bytes"]): row["ms"]["bytes"] / row["ms"]["shm"]}
    return summary


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = figure(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure(rows: list[dict]) -> Any:
    """Latency against payload, one panel per op, log axes; x ticks at the measured sizes, named as the
    table names them, and no labels on minor ticks (on a short log range matplotlib labels those too, and
    they overlapped)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(1, len(OPS), figsize=(5 * len(OPS), 4), sharey=True)
    for ax, op in zip(axes, OPS, strict=True):
        ops = [r for r in rows if r["op"] == op]
        sizes = [r["x_bytes"] for r in ops]
        for name in ("bytes", "stream", "shm", "echo", "echo-stream"):
            if all(name in r["ms"] for r in ops):
                style = "--" if name.startswith("echo") else "-"
                ax.plot(sizes, [r["ms"][name] for r in ops], style, marker="o", label=name)
        ax.set(xscale="log", yscale="log", title=op, xlabel="x bytes")
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_label(size) for size in sizes], rotation=45, ha="right")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median latency (ms)")
    axes[0].legend()
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------- command line
def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(add: Callable[..., Any]) -> None:
    """The bench's flags, through ``add`` (a parser's ``add_argument``, or the CLI's env-aware one)."""
    add("--target", help="a running server HOST:PORT on this host (default: start one here)")
    add("--quick", action="store_true", help="4 KB and 64 KB only, few repeats (a smoke test)")
    add("--json", type=Path, default=OUTPUT / "bench.json", help="where to write the JSON")
    add("--plot", type=Path, default=OUTPUT / "bench.png", help="where to write the PNG")
    add("--concurrency-seconds", type=_seconds, default=3.0, help="length of each throughput run")


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = QUICK if args.quick else SIZES
    with contextlib.ExitStack() as running_now:
        echo_target = running_now.enter_context(echo_server())
        target = args.target or running_now.enter_context(normserve_server("--shared-memory"))
        print(f"normserve {target} vs echo {echo_target}; x is (N, {CHANNELS}, L) float32; medians\n")
        print(HEADER, flush=True)
        echo = Echo(echo_target)
        with _Progress(sum(r for _, r in sizes) * len(OPS)) as progress:
            rows = measure_sizes(target, echo, sizes, progress)
        echo.channel.close()
        concurrency = [
            measure_concurrency(target, echo_target, nbytes, args.concurrency_seconds / (4 if args.quick else 1))
            for nbytes in ((4 << 10,) if args.quick else (4 << 10, 1 << 20))
        ]
    for c in concurrency:
        print(
            f"\n{CONCURRENT_CLIENTS} clients, Infer {_label(c['x_bytes'])}: {c['normserve_calls_per_s']:.0f} calls/s, "
            f"echo {c['echo_calls_per_s']:.0f} calls/s"
        )
    summary = summarize(rows, concurrency)
    print("\n" + json.dumps(summary, indent=2))
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "grpc": grpc.__version__,
        "rows": rows,
        "concurrency": concurrency,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return report


class _Progress:
    """Rounds done, on stderr; the table's rows on stdout. On a terminal, a tqdm bar that rows are printed
    above; elsewhere (a log, a pipe, ``2>&1``) one whole line per row, so the bar's redraws never split a row."""

    def __init__(self, total: int) -> None:
        self._total, self._done = total, 0
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="round", file=sys.stderr)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def __call__(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
            return
        print(line, flush=True)
        print(f"bench: {self._done} of {self._total} rounds", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser.add_argument)
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    children.exit_on_signals()
    if args.serve_echo:
        asyncio.run(_serve_echo())
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
