"""normserve over gRPC vs a bare grpc.aio echo of the same bytes, plus the store's write cost.

The measurement is ``normserve bench`` (normserve.tools.bench: bytes, streams
and shared memory from 4 KB to 64 MB, 8 concurrent clients, JSON and a PNG);
this script runs it on a server of its own and adds the SQLite write a Train
commits (fsync'd with --sync full, and with --sync normal).

    python benchmarks/service.py            # table + benchmarks/out/service.json + service.png
    python benchmarks/service.py --quick    # 4 KB and 64 KB, few repeats (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from normserve.server.store import StateStore
from normserve.tools import bench, children

OUT = Path(__file__).parent / "out"


def measure_store_writes(repeats: int, channels: int = bench.CHANNELS) -> dict[str, float]:
    """Median ms of the SQLite transaction a Train of a 64-channel BatchNorm commits."""
    rng = np.random.default_rng(1)
    state = {k: rng.normal(size=channels).astype(np.float32) for k in ("running_mean", "running_var")}
    result = {}
    for mode in ("FULL", "NORMAL"):
        with tempfile.TemporaryDirectory() as directory:
            store = StateStore(directory, synchronous=mode)
            store.create_layer(
                "bn", b"", 1, 0, {**state, "weight": state["running_var"], "bias": state["running_mean"]}
            )
            times = []
            for version in range(2, repeats + 2):
                start = time.perf_counter()
                store.update_state("bn", version, 1, state)
                times.append(time.perf_counter() - start)
            result[mode.lower()] = statistics.median(times) * 1e3
            store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser.add_argument)
    parser.set_defaults(json=OUT / "service.json", plot=OUT / "service.png")
    args = parser.parse_args()
    children.exit_on_signals()  # SIGTERM unwinds: the servers bench.run started stop
    report = bench.run(args)
    writes = measure_store_writes(20 if args.quick else 300)
    print(
        f"\nSQLite write per Train ({bench.CHANNELS} channels): {writes['full']:.3f} ms fsync'd (--sync full), "
        f"{writes['normal']:.3f} ms (--sync normal)"
    )
    report["store_write_ms"] = writes
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
