"""normkernels vs torch CPU: every kind x {train forward, eval forward, train forward+backward}.

Both run in this process, on the same arrays (torch wraps the NumPy buffers
without copying), with the same state. Each case is timed alternately, ours
then torch's, and the median of the repeats is reported. The summary is the
geometric mean of time(ours) / time(torch) over all cases: below 1.0 means
normkernels is faster.

    python benchmarks/kernels.py                 # full table, JSON in benchmarks/out/
    python benchmarks/kernels.py --quick         # tiny shapes, a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import normkernels as nk

SIZES = {
    # kind: [(label, layer config, input shape), ...]
    "batch_norm": [
        ("small", {"num_features": 32}, (64, 32)),
        ("medium", {"num_features": 64}, (32, 64, 32, 32)),
        ("large", {"num_features": 128}, (32, 128, 48, 48)),
    ],
    "instance_norm": [
        ("small", {"num_features": 32, "affine": True, "track_running_stats": True}, (16, 32, 8)),
        ("medium", {"num_features": 64, "affine": True, "track_running_stats": True}, (32, 64, 32, 32)),
        ("large", {"num_features": 128, "affine": True, "track_running_stats": True}, (32, 128, 48, 48)),
    ],
    "group_norm": [
        ("small", {"num_groups": 8, "num_channels": 32}, (64, 32)),
        ("medium", {"num_groups": 8, "num_channels": 64}, (32, 64, 32, 32)),
        ("large", {"num_groups": 32, "num_channels": 128}, (32, 128, 48, 48)),
    ],
    "layer_norm": [
        ("small", {"normalized_shape": 32}, (64, 32)),
        ("medium", {"normalized_shape": 1024}, (2048, 1024)),
        ("large", {"normalized_shape": 4096}, (2304, 4096)),
    ],
    "rms_norm": [
        ("small", {"normalized_shape": 32}, (64, 32)),
        ("medium", {"normalized_shape": 1024}, (2048, 1024)),
        ("large", {"normalized_shape": 4096}, (2304, 4096)),
    ],
}
QUICK = {kind: cases[:1] for kind, cases in SIZES.items()}  # the small shapes only


def torch_module(layer: nk.NormLayer, rank: int) -> torch.nn.Module:
    cfg = {k: v for k, v in layer.config.items() if k not in ("device", "dtype", "biased_running_var")}
    if layer.kind == "batch_norm":
        return (torch.nn.BatchNorm1d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[rank - 2](**cfg)
    if layer.kind == "instance_norm":
        return (None, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)[rank - 2](**cfg)
    return {"group_norm": torch.nn.GroupNorm, "layer_norm": torch.nn.LayerNorm, "rms_norm": torch.nn.RMSNorm}[
        layer.kind
    ](**cfg)


def callables(kind: str, cfg: dict, shape: tuple[int, ...], rng: np.random.Generator):
    layer = nk.make_layer(kind, **cfg)
    module = torch_module(layer, len(shape))
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layer.state_dict().items()})
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    xt_grad = xt.clone().requires_grad_(True)

    def torch_forward(training: bool):
        module.train(training)
        with torch.no_grad():
            return module(xt)

    def torch_fwd_bwd():
        module.train(True)
        xt_grad.grad = None
        module(xt_grad).backward(dyt)

    def ours_fwd_bwd():
        layer.forward(x, training=True)
        return layer.backward(x, dy, training=True)

    return {
        "train forward": (lambda: layer.forward(x, training=True), lambda: torch_forward(True)),
        "eval forward": (lambda: layer.forward(x, training=False), lambda: torch_forward(False)),
        "train fwd+bwd": (ours_fwd_bwd, torch_fwd_bwd),
    }


def time_pair(ours, theirs, min_time: float, rounds: int) -> tuple[float, float]:
    """Median seconds per call of each.

    The two alternate in ``rounds`` runs of about ``min_time / rounds``
    seconds each, not call by call: each library's idle worker threads spin
    for a while after a call (OpenBLAS's and torch's OpenMP pool) and would
    otherwise steal this 2-core machine's cores from the other.
    """
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for f, bucket in zip((ours, theirs), samples, strict=True):
            f()  # warm-up after the switch
            spent = 0.0
            while spent < min_time / (2 * rounds) or len(bucket) % 3:
                t0 = time.perf_counter()
                f()
                elapsed = time.perf_counter() - t0
                bucket.append(elapsed)
                spent += elapsed
    return statistics.median(samples[0]), statistics.median(samples[1])


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "kernels.json")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds spent per case (default 2.0)")
    parser.add_argument("--kinds", nargs="*", default=sorted(SIZES), choices=sorted(SIZES))
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else SIZES
    min_time, rounds = (0.01, 2) if args.quick else (args.min_time, 5)
    rng = np.random.default_rng(0)

    rows = []
    header = f"{'kind':<14}{'size':<8}{'shape':<20}{'op':<15}{'ours ms':>10}{'torch ms':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        for label, cfg, shape in sizes[kind]:
            for op, (ours, theirs) in callables(kind, cfg, shape, rng).items():
                t_ours, t_torch = time_pair(ours, theirs, min_time, rounds)
                row = {
                    "kind": kind,
                    "size": label,
                    "shape": list(shape),
                    "op": op,
                    "ours_ms": t_ours * 1e3,
                    "torch_ms": t_torch * 1e3,
                    "ratio": t_ours / t_torch,
                }
                rows.append(row)
                print(
                    f"{kind:<14}{label:<8}{'x'.join(map(str, shape)):<20}{op:<15}"
                    f"{row['ours_ms']:>10.3f}{row['torch_ms']:>10.3f}{row['ratio']:>8.2f}",
                    flush=True,
                )
    geomean = math.exp(statistics.fmean(math.log(r["ratio"]) for r in rows))
    print(f"\ngeometric mean time ratio ours/torch over {len(rows)} cases: {geomean:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "geomean_ratio": geomean, "cases": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
