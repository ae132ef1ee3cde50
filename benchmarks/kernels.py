"""normkernels vs torch CPU: every kind x {train forward, eval forward, train forward+backward}.

Three contenders run in this process on the same arrays (torch wraps the NumPy
buffers without copying), with the same state: normkernels on its compiled
CPU kernels (numba), normkernels on its NumPy core (NORMKERNELS_CPU=numpy)
and torch. Each case is timed in alternating rounds and the median of the
repeats is reported. The summary is the geometric mean of time(ours) /
time(torch) over all cases: below 1.0 means normkernels is faster.

Bandwidth: each case also reports its effective GB/s, the bytes it must move
over its time. Every input is read once and every output written once (y;
dx, and y of the forward before it); batch norm's statistics span the whole
batch, so its training passes read x (and dy) once more. The reference is a
plain copy measured in the same run: ``x.copy()``, which, like every output
here, writes a new array (``np.copyto`` into a buffer written before, which
pays no page faults, is reported beside it).

    python benchmarks/kernels.py                 # full table, JSON in benchmarks/out/
    python benchmarks/kernels.py --quick         # tiny shapes, a smoke test
    python benchmarks/kernels.py --calibrate     # where two threads start to beat one (PARALLEL_MIN_BYTES)
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import normkernels as nk
from normkernels import compiled

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


def _layer(kind: str, cfg: dict, cpu: str) -> nk.NormLayer:
    """A layer on one CPU path: "numba" (the compiled kernels) or "numpy" (the core)."""
    saved = os.environ.get("NORMKERNELS_CPU")
    os.environ["NORMKERNELS_CPU"] = cpu  # read when the layer picks its math
    try:
        return nk.make_layer(kind, **cfg)
    finally:
        if saved is None:
            del os.environ["NORMKERNELS_CPU"]
        else:
            os.environ["NORMKERNELS_CPU"] = saved


def callables(kind: str, cfg: dict, shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, tuple]:
    """Per op: the numba, numpy and torch callables."""
    layers = {cpu: _layer(kind, cfg, cpu) for cpu in ("numba", "numpy")}
    module = torch_module(layers["numba"], len(shape))
    module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in layers["numba"].state_dict().items()})
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

    def ours(layer: nk.NormLayer) -> dict[str, Callable]:
        def fwd_bwd():
            layer.forward(x, training=True)
            return layer.backward(x, dy, training=True)

        return {
            "train forward": lambda: layer.forward(x, training=True),
            "eval forward": lambda: layer.forward(x, training=False),
            "train fwd+bwd": fwd_bwd,
        }

    numba_path, numpy_path = ours(layers["numba"]), ours(layers["numpy"])
    theirs = {
        "train forward": lambda: torch_forward(True),
        "eval forward": lambda: torch_forward(False),
        "train fwd+bwd": torch_fwd_bwd,
    }
    return {op: (numba_path[op], numpy_path[op], theirs[op]) for op in theirs}


def bytes_moved(kind: str, op: str, nbytes: int) -> int:
    """Bytes a case must move between memory and the cores (see the module docstring)."""
    passes = {"train forward": 2, "eval forward": 2, "train fwd+bwd": 5}[op]  # x, y; + x, dy, dx
    if kind == "batch_norm":  # statistics over the whole batch: x (and dy) once more per training pass
        passes += {"train forward": 1, "eval forward": 0, "train fwd+bwd": 3}[op]
    return passes * nbytes


def time_all(fns: list[Callable] | tuple[Callable, ...], min_time: float, rounds: int) -> list[float]:
    """Median seconds per call of each of ``fns``.

    They alternate in ``rounds`` runs of about ``min_time / rounds`` seconds
    each, not call by call: each library's idle worker threads spin for a
    while after a call (OpenBLAS's, torch's and numba's pools) and would
    otherwise steal this 2-core machine's cores from the next.
    """
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for f, bucket in zip(fns, samples, strict=True):
            f()  # warm-up after the switch
            spent = 0.0
            while spent < min_time / (len(fns) * rounds) or len(bucket) % 3:
                t0 = time.perf_counter()
                f()
                elapsed = time.perf_counter() - t0
                bucket.append(elapsed)
                spent += elapsed
    return [statistics.median(bucket) for bucket in samples]


def copy_bandwidth(nbytes: int, min_time: float) -> dict[str, float]:
    """GB/s (bytes read + written) of a plain copy of ``nbytes``: into a new array, and into a used one."""
    x = np.ones(nbytes // 4, np.float32)
    used = np.empty_like(x)
    fresh, into_used = time_all([x.copy, lambda: np.copyto(used, x)], min_time, 3)
    return {"new array": 2 * nbytes / fresh / 1e9, "used array": 2 * nbytes / into_used / 1e9}


def calibrate(min_time: float) -> None:
    """The compiled kernels on one thread and on all, size by size: where do threads start to pay?"""
    rng = np.random.default_rng(0)
    print(f"{'elements':>10}{'bytes':>10}  time on one thread / on {compiled.threads()} threads")
    saved = compiled.PARALLEL_MIN_BYTES
    compiled.PARALLEL_MIN_BYTES = 0  # split every size, to see what splitting gains
    try:
        for exponent in range(10, 21):
            n = 1 << exponent
            ratios = []
            for kind, cfg, shape in (
                ("layer_norm", {"normalized_shape": 256}, (n // 256, 256)),
                ("batch_norm", {"num_features": 16}, (n // 1024, 16, 64)),
                ("group_norm", {"num_groups": 4, "num_channels": 16}, (n // 1024, 16, 64)),
            ):
                layer = nk.make_layer(kind, **cfg)
                x = rng.normal(size=shape).astype(np.float32)
                compiled.set_threads(1)
                (one,) = time_all([lambda layer=layer, x=x: layer.forward(x)], min_time, 3)
                compiled.set_threads(None)
                (many,) = time_all([lambda layer=layer, x=x: layer.forward(x)], min_time, 3)
                ratios.append(f"{kind} {one / many:.2f}")
            print(f"{n:>10}{4 * n:>10}  " + "  ".join(ratios), flush=True)
    finally:
        compiled.PARALLEL_MIN_BYTES = saved
        compiled.set_threads(None)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "kernel_threads": compiled.threads(),
    }


GOALS = {"geomean_ratio": 0.8, "worst_ratio": 1.5, "large_copy_fraction": 0.8}


def _print_summary(rows: list[dict]) -> dict:
    def geomean(key: str) -> float:
        return math.exp(statistics.fmean(math.log(r[key]) for r in rows))

    worst = max(rows, key=lambda r: r["ratio"])
    large = [r for r in rows if r["size"] == "large"]
    least = min(large, key=lambda r: r["copy_fraction"]) if large else None
    summary = {
        "geomean_ratio": geomean("ratio"),
        "numpy_geomean_ratio": geomean("numpy_ratio"),
        "worst_ratio": worst["ratio"],
        "least_large_copy_fraction": None if least is None else least["copy_fraction"],
    }
    print(f"\ngeometric mean time ratio ours/torch over {len(rows)} cases: {summary['geomean_ratio']:.3f}")
    print(f"the same on the NumPy core: {summary['numpy_geomean_ratio']:.3f}")
    print(f"worst case: {worst['kind']} {worst['size']} {worst['op']}, {worst['ratio']:.2f}x torch's time")
    met = {
        "geomean_ratio": summary["geomean_ratio"] <= GOALS["geomean_ratio"],
        "worst_ratio": worst["ratio"] <= GOALS["worst_ratio"],
    }
    if least is not None:
        print(f"large tensors: at least {least['copy_fraction']:.0%} of a copy's GB/s ({least['kind']} {least['op']})")
        met["large_copy_fraction"] = least["copy_fraction"] >= GOALS["large_copy_fraction"]
    print(
        "goals (<= 0.8 geomean, <= 1.5 worst, >= 80% copy bandwidth on large): "
        + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items())
    )
    return {**summary, "goals": GOALS, "goals_met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "kernels.json")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds spent per case (default 3.0)")
    parser.add_argument("--kinds", nargs="*", default=sorted(SIZES), choices=sorted(SIZES))
    parser.add_argument("--calibrate", action="store_true", help="one thread vs all, by size; then exit")
    args = parser.parse_args(argv)
    warm = compiled.warm_up()  # compiling (or loading) the kernels is not part of any case
    if args.calibrate:
        calibrate(0.3)
        return 0
    sizes = QUICK if args.quick else SIZES
    min_time, rounds = (0.01, 2) if args.quick else (args.min_time, 5)
    rng = np.random.default_rng(0)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    copies = {label: copy_bandwidth(4 * math.prod(shape), min_time) for label, _, shape in sizes["batch_norm"]}
    for label, gbps in copies.items():
        print(
            f"plain copy, {label}: {gbps['new array']:.1f} GB/s into a new array, "
            f"{gbps['used array']:.1f} into a used one"
        )

    rows = []
    header = (
        f"{'kind':<14}{'size':<8}{'shape':<15}{'op':<15}{'numba ms':>9}{'numpy ms':>9}{'torch ms':>9}"
        f"{'ratio':>7}{'np ratio':>9}{'GB/s':>7}{'/copy':>7}"
    )
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        for label, cfg, shape in sizes[kind]:
            nbytes = 4 * math.prod(shape)
            for op, fns in callables(kind, cfg, shape, rng).items():
                t_numba, t_numpy, t_torch = time_all(fns, min_time, rounds)
                moved = bytes_moved(kind, op, nbytes)
                row = {
                    "kind": kind,
                    "size": label,
                    "shape": list(shape),
                    "op": op,
                    "ours_ms": t_numba * 1e3,
                    "numpy_ms": t_numpy * 1e3,
                    "torch_ms": t_torch * 1e3,
                    "ratio": t_numba / t_torch,
                    "numpy_ratio": t_numpy / t_torch,
                    "bytes_moved": moved,
                    "gbps": moved / t_numba / 1e9,
                    "copy_fraction": moved / t_numba / 1e9 / copies[label]["new array"],
                }
                rows.append(row)
                print(
                    f"{kind:<14}{label:<8}{'x'.join(map(str, shape)):<15}{op:<15}{row['ours_ms']:>9.3f}"
                    f"{row['numpy_ms']:>9.3f}{row['torch_ms']:>9.3f}{row['ratio']:>7.2f}{row['numpy_ratio']:>9.2f}"
                    f"{row['gbps']:>7.1f}{row['copy_fraction']:>7.2f}",
                    flush=True,
                )
    summary = _print_summary(rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "load_average": [*load, *os.getloadavg()],  # at the start, then at the end
        "kernels": None if warm is None else warm._asdict(),
        "copy_gbps": copies,
        **summary,
        "cases": rows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
