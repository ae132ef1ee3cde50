"""Layer-sharded replicas behind nginx (``normserve cluster``): what the proxy adds to a small call, and the calls
per second of 8 client processes over 1, 2 and 4 replicas, with the CPU each part spends per call.

    python benchmarks/cluster.py            # table + benchmarks/out/cluster.json
    python benchmarks/cluster.py --quick    # 1 and 2 replicas, short runs (a smoke test)

A small call is an Infer of a 4 KB batch (16 x 64 float32) on a 64-channel BatchNorm, the service
benchmark's smallest size. Latency: the same layer called directly at its replica and through nginx, in
alternating rounds (tools.bench.alternate), median ms. Throughput: 8 client processes (spawned: one GIL
each, as 8 trainers would be), each calling Infer round-robin over 32 layers for --seconds, through nginx;
"direct" is the same 8 clients on one replica without nginx. CPU per call is the CPU time (user + system,
from /proc) that nginx, the replicas and the clients spent during the run, divided by the calls made.
Needs nginx.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from normserve.client import NormClient
from normserve.tools import bench, children
from normserve.tools.cluster import Cluster, free_port_block
from normserve.tools.nginx import NginxMissing, Ring, find_nginx

OUT = Path(__file__).parent / "out"
CLIENTS = 8
LAYERS = 32
SHAPE = (16, bench.CHANNELS)  # 4 KB of float32
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` and their children (nginx's workers)."""
    total = 0.0
    for pid in _with_children(pids):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _with_children(pids: list[int]) -> set[int]:
    found = set(pids)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            if parent in pids:
                found.add(int(entry))
    return found


# ---------------------------------------------------------------------- latency
def latency(cluster: Cluster, repeats: int) -> dict[str, float]:
    """Median ms of one small Infer: at its replica directly, and through nginx."""
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    with NormClient(cluster.front) as front:
        front.create_layer("latency.bn", "batch_norm", num_features=bench.CHANNELS)
        with NormClient(Ring(cluster.addresses).owner("latency.bn")) as direct:
            proxied, local = front.layer("latency.bn"), direct.layer("latency.bn")
            times = bench.alternate({"direct": lambda: local.infer(x), "nginx": lambda: proxied.infer(x)}, repeats, _no)
    return {**times, "added": times["nginx"] - times["direct"]}


def _no() -> None:
    pass


# ---------------------------------------------------------------------- throughput
def _client(target: str, ready: Any, seconds: float, results: Any, parent: int) -> None:
    """One client process: once all are warm (``ready``), Infer round-robin over the layers for ``seconds``."""
    children.end_with_parent(parent)  # a killed benchmark leaves no client behind
    x = np.random.default_rng(os.getpid()).normal(size=SHAPE).astype(np.float32)
    with NormClient(target, timeout=60) as nc:
        layers = [nc.layer(f"load.{i}") for i in range(LAYERS)]
        for layer in layers:
            layer.infer(x)  # connected, warm
        ready.wait()
        before, calls = time.process_time(), 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            layers[calls % LAYERS].infer(x)
            calls += 1
        results.put((calls, time.process_time() - before))


def throughput(target: str, server_pids: list[int], nginx_pids: list[int], seconds: float) -> dict[str, float]:
    with NormClient(target) as nc:
        for i in range(LAYERS):
            nc.create_layer(f"load.{i}", "batch_norm", num_features=bench.CHANNELS)
    spawn = multiprocessing.get_context("spawn")  # gRPC channels and fork do not mix
    results, ready = spawn.Queue(), spawn.Barrier(CLIENTS + 1)
    clients = [
        spawn.Process(target=_client, args=(target, ready, seconds, results, os.getpid()), daemon=True)
        for _ in range(CLIENTS)
    ]
    for process in clients:
        process.start()
    ready.wait(timeout=120)
    server_cpu, nginx_cpu, load = cpu_seconds(server_pids), cpu_seconds(nginx_pids), os.getloadavg()[0]
    time.sleep(seconds)
    server_cpu, nginx_cpu = cpu_seconds(server_pids) - server_cpu, cpu_seconds(nginx_pids) - nginx_cpu
    answers = [results.get(timeout=120) for _ in clients]
    for process in clients:
        process.join(60)
    calls = sum(n for n, _ in answers)
    return {
        "calls_per_s": calls / seconds,
        "server_cpu_ms_per_call": 1e3 * server_cpu / calls,
        "nginx_cpu_ms_per_call": 1e3 * nginx_cpu / calls,
        "client_cpu_ms_per_call": 1e3 * sum(cpu for _, cpu in answers) / calls,
        "load_average_at_start": load,
    }


def run_cluster(replicas: int, seconds: float, directory: Path) -> dict[str, float]:
    with Cluster(replicas, free_port_block(replicas + 1), directory / f"r{replicas}") as cluster:
        cluster.start(120)
        pids = [r.process.pid for r in cluster.replicas]
        return {"replicas": replicas, **throughput(cluster.front, pids, [cluster.nginx.process.pid], seconds)}


def run_direct(seconds: float, directory: Path) -> dict[str, float]:
    with Cluster(1, free_port_block(2), directory / "direct") as cluster:
        cluster.start(120)
        replica = cluster.replicas[0]
        return {"replicas": 1, **throughput(replica.address, [replica.process.pid], [], seconds)}


# ---------------------------------------------------------------------- report
def paper(latency_ms: dict[str, float], rows: list[dict[str, Any]]) -> dict[str, float]:
    """Calls/s per core of a replica, of nginx and of a client, from the CPU each spent per call in the run with
    the most replicas: with CPU the limit, what N hosts would serve."""
    widest = max((row for row in rows if row["path"] == "nginx"), key=lambda row: row["replicas"])
    return {
        "replica_calls_per_core_s": 1e3 / widest["server_cpu_ms_per_call"],
        "nginx_calls_per_core_s": 1e3 / widest["nginx_cpu_ms_per_call"],
        "client_calls_per_core_s": 1e3 / widest["client_cpu_ms_per_call"],
        "added_latency_ms": latency_ms["added"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 2 replicas, 1 s runs, few latency rounds")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--json", type=Path, default=OUT / "cluster.json")
    args = parser.parse_args(argv)
    children.exit_on_signals()  # SIGTERM and SIGHUP unwind as Ctrl-C does: the clusters stop, then the clients
    try:
        find_nginx()
    except NginxMissing as missing:
        print(f"benchmarks/cluster.py runs nginx: {missing}", file=sys.stderr)
        return 2
    seconds = 1.0 if args.quick else args.seconds
    counts = (1, 2) if args.quick else (1, 2, 4)
    with tempfile.TemporaryDirectory(prefix="normserve-cluster-bench-") as scratch:
        directory = Path(scratch)
        with Cluster(2, free_port_block(3), directory / "latency") as cluster:
            cluster.start(120)
            latency_ms = latency(cluster, 100 if args.quick else 2000)
        rows = [{"path": "direct", **run_direct(seconds, directory)}]
        rows += [{"path": "nginx", **run_cluster(n, seconds, directory)} for n in counts]
    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "small_call_ms": latency_ms,
        "throughput": rows,
        "paper": paper(latency_ms, rows),
    }
    print(
        f"small Infer (4 KB), median of alternating calls: direct {latency_ms['direct']:.3f} ms, "
        f"through nginx {latency_ms['nginx']:.3f} ms (+{latency_ms['added']:.3f} ms)"
    )
    print(f"\n{CLIENTS} client processes, Infer 4 KB over {LAYERS} layers, {seconds:g} s each:")
    print("| path | replicas | calls/s | CPU ms/call: replicas | nginx | clients | load avg |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['path']} | {row['replicas']} | {row['calls_per_s']:.0f} | {row['server_cpu_ms_per_call']:.3f} "
            f"| {row['nginx_cpu_ms_per_call']:.3f} | {row['client_cpu_ms_per_call']:.3f} "
            f"| {row['load_average_at_start']:.2f} |"
        )
    summary = report["paper"]
    print(
        f"\nper core: a replica serves {summary['replica_calls_per_core_s']:.0f} calls/s, nginx proxies "
        f"{summary['nginx_calls_per_core_s']:.0f} calls/s, a client makes {summary['client_calls_per_core_s']:.0f}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
