"""normkernels vs torch CPU: every kind x {train forward, eval forward, train forward+backward}.

The contenders run in this process on the same arrays (torch wraps the NumPy
buffers without copying), with the same state: normkernels on its compiled
CPU kernels (numba), with ``--numpy`` normkernels on its NumPy core
(NORMKERNELS_CPU=numpy), and torch (2 intra-op threads unless told). Each
case is timed in interleaved rounds (ours, torch, ours, ...; the machine may
be shared) and the median of the repeats is reported.

The sweep (:data:`SIZES`) is the shapes users run: transformer rows of widths
64-8192 (768, 1536, 3072, 5120 among them) and 1-16384 rows, conv feature maps
of 16-512 channels, 7-128 pixels a side and batches of 1-64, single samples.
The summary is the geometric mean of time(ours) / time(torch) over all cases:
below 1.0 means normkernels is faster.

Bandwidth: each case also reports its effective GB/s, the bytes it must move
over its time. Every input is read once and every output written once (y;
dx, and y of the forward before it); batch norm's statistics span the whole
batch, so its training passes read x (and dy) once more. The reference is a
plain copy measured in the same run: ``x.copy()``, which, like every output
here, writes a new array (``np.copyto`` into a buffer written before, which
pays no page faults, is reported beside it).

    python benchmarks/kernels.py                 # the sweep (61 shapes x 3 ops), JSON in benchmarks/out/
    python benchmarks/kernels.py --numpy         # the same, with the NumPy core's column
    python benchmarks/kernels.py --quick         # two small shapes per kind, a smoke test
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
from typing import Any

import numpy as np
import torch

import normkernels as nk
from normkernels import compiled


def _size(shape: tuple[int, ...]) -> str:
    """The size class of a float32 input (its plain copy is measured once per class)."""
    nbytes = 4 * math.prod(shape)
    return "small" if nbytes < 256 << 10 else "medium" if nbytes < 16 << 20 else "large"


def _cases(kind: str, config: Callable[[int], dict], shapes: list[tuple[int, ...]]) -> list[tuple]:
    """(size, layer config, shape) per shape; the config from the shape's features (dimension 1, or the last)."""
    features = (lambda s: s[-1]) if kind in ("layer_norm", "rms_norm") else (lambda s: s[1])
    return [(_size(shape), config(features(shape)), shape) for shape in shapes]


_TRACKED = {"affine": True, "track_running_stats": True}
#: The sweep: shapes users run. Transformer rows (rows x width; widths 64-8192 with the non-powers of
#: two of common models, rows 1-16384, single rows for one-token inference) for layer and RMS norm;
#: conv feature maps (batch 1-64, 16-512 channels, 7-128 pixels a side) for the channel kinds,
#: batch 1 for single-sample inference; MLP activations (N, C) for batch norm.
SIZES = {
    "batch_norm": _cases(
        "batch_norm",
        lambda c: {"num_features": c},
        [
            (64, 32),
            (256, 1024),
            (1, 64, 56, 56),
            (1, 512, 7, 7),
            (8, 16, 128, 128),
            (4, 32, 64, 64),
            (32, 64, 28, 28),
            (32, 64, 32, 32),
            (64, 128, 14, 14),
            (16, 256, 14, 14),
            (64, 512, 7, 7),
            (32, 128, 48, 48),
        ],
    ),
    "instance_norm": _cases(
        "instance_norm",
        lambda c: {"num_features": c, **_TRACKED},
        [
            (16, 32, 8),
            (1, 64, 56, 56),
            (16, 64, 28, 28),
            (8, 128, 32, 32),
            (4, 32, 128, 128),
            (32, 256, 14, 14),
            (64, 512, 7, 7),
        ],
    ),
    "group_norm": _cases(
        "group_norm",
        lambda c: {"num_groups": min(32, c // 2), "num_channels": c},
        [
            (64, 32),
            (1, 64, 56, 56),
            (16, 64, 28, 28),
            (8, 128, 32, 32),
            (4, 32, 128, 128),
            (32, 256, 14, 14),
            (64, 512, 7, 7),
            (32, 128, 48, 48),
            (2, 16, 112, 112),
        ],
    ),
    "layer_norm": _cases(
        "layer_norm",
        lambda d: {"normalized_shape": d},
        [
            (1, 768),
            (1, 4096),
            (16, 64),
            (64, 32),
            (64, 256),
            (128, 768),
            (512, 1536),
            (2048, 768),
            (2048, 1024),
            (4096, 64),
            (16384, 64),
            (16384, 256),
            (1024, 3072),
            (512, 5120),
            (256, 8192),
            (2304, 4096),
            (4, 8192),
        ],
    ),
    "rms_norm": _cases(
        "rms_norm",
        lambda d: {"normalized_shape": d},
        [
            (1, 768),
            (1, 4096),
            (64, 32),
            (64, 256),
            (2048, 768),
            (512, 1536),
            (4096, 1024),
            (1024, 3072),
            (512, 5120),
            (256, 8192),
            (16384, 128),
        ],
    ),
    "layer_norm_2d": _cases(
        "layer_norm_2d",
        lambda c: {"num_features": c},
        [(1, 96, 56, 56), (16, 96, 56, 56), (32, 192, 28, 28), (8, 384, 14, 14), (64, 768, 7, 7)],
    ),
}
#: --quick: two small shapes per kind (a smoke test of every code path).
QUICK = {kind: [case for case in cases if case[0] == "small"][:2] or cases[:1] for kind, cases in SIZES.items()}


class _LayerNorm2d(torch.nn.Module):
    """timm's LayerNorm2d: torch's layer norm over the channels of a channels-last permutation."""

    def __init__(self, num_features: int, eps: float, elementwise_affine: bool, bias: bool) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(num_features, eps=eps, elementwise_affine=elementwise_affine, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def load_state_dict(self, state: dict, strict: bool = True) -> Any:
        return self.norm.load_state_dict(state, strict)


def torch_module(layer: nk.NormLayer, rank: int) -> torch.nn.Module:
    cfg = {k: v for k, v in layer.config.items() if k not in ("device", "dtype", "biased_running_var")}
    if layer.kind == "batch_norm":
        return (torch.nn.BatchNorm1d, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[rank - 2](**cfg)
    if layer.kind == "instance_norm":
        return (None, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)[rank - 2](**cfg)
    return {
        "group_norm": torch.nn.GroupNorm,
        "layer_norm": torch.nn.LayerNorm,
        "rms_norm": torch.nn.RMSNorm,
        "layer_norm_2d": _LayerNorm2d,
    }[layer.kind](**cfg)


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


def callables(
    kind: str, cfg: dict, shape: tuple[int, ...], rng: np.random.Generator, with_numpy: bool
) -> dict[str, tuple]:
    """Per op: the numba, (numpy,) and torch callables."""
    paths = ("numba", "numpy") if with_numpy else ("numba",)
    layers = {cpu: _layer(kind, cfg, cpu) for cpu in paths}
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

    mine = [ours(layers[cpu]) for cpu in paths]
    theirs = {
        "train forward": lambda: torch_forward(True),
        "eval forward": lambda: torch_forward(False),
        "train fwd+bwd": torch_fwd_bwd,
    }
    return {op: (*(m[op] for m in mine), theirs[op]) for op in theirs}


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


#: The plain copy measured for each size class (bytes): the same sizes as the issue 19 table's.
COPY_BYTES = {"small": 8 << 10, "medium": 8 << 20, "large": 4 * 32 * 128 * 48 * 48}


def copy_bandwidth(nbytes: int, min_time: float) -> dict[str, float]:
    """GB/s (bytes read + written) of a plain copy of ``nbytes``: into a new array, and into a used one."""
    x = np.random.default_rng(0).normal(size=nbytes // 4).astype(np.float32)
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


GOALS = {"geomean_ratio": 0.6, "worst_ratio": 1.2, "large_copy_fraction": 0.8}
#: How many of the slowest cases (against torch) the summary lists.
WORST = 5


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _print_summary(rows: list[dict]) -> dict:
    worst = sorted(rows, key=lambda r: r["ratio"], reverse=True)[:WORST]
    large = [r for r in rows if r["size"] == "large"]
    least = min(large, key=lambda r: r["copy_fraction"]) if large else None
    summary = {
        "geomean_ratio": _geomean([r["ratio"] for r in rows]),
        "numpy_geomean_ratio": _geomean([r["numpy_ratio"] for r in rows]) if "numpy_ratio" in rows[0] else None,
        "worst_ratio": worst[0]["ratio"],
        "worst_cases": [{k: r[k] for k in ("kind", "shape", "op", "ours_ms", "torch_ms", "ratio")} for r in worst],
        "least_large_copy_fraction": None if least is None else least["copy_fraction"],
    }
    print(f"\ngeometric mean time ratio ours/torch over {len(rows)} cases: {summary['geomean_ratio']:.3f}")
    if summary["numpy_geomean_ratio"] is not None:
        print(f"the same on the NumPy core: {summary['numpy_geomean_ratio']:.3f}")
    print(f"the {len(worst)} slowest against torch:")
    for r in worst:
        print(f"  {r['kind']} {'x'.join(map(str, r['shape']))} {r['op']}: {r['ratio']:.2f}x torch's time")
    met = {
        "geomean_ratio": summary["geomean_ratio"] <= GOALS["geomean_ratio"],
        "worst_ratio": summary["worst_ratio"] <= GOALS["worst_ratio"],
    }
    if least is not None:
        print(f"large tensors: at least {least['copy_fraction']:.0%} of a copy's GB/s ({least['kind']} {least['op']})")
        met["large_copy_fraction"] = least["copy_fraction"] >= GOALS["large_copy_fraction"]
    print(
        f"goals (<= {GOALS['geomean_ratio']} geomean, <= {GOALS['worst_ratio']} worst, >= 80% copy bandwidth on "
        "large): " + ", ".join(f"{name} {'met' if ok else 'NOT met'}" for name, ok in met.items())
    )
    return {**summary, "goals": GOALS, "goals_met": met}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes per kind, few repeats (smoke test)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "kernels.json")
    parser.add_argument("--min-time", type=float, default=0.6, help="seconds spent per case (default 0.6)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case (default 5)")
    parser.add_argument("--kinds", nargs="*", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--numpy", action="store_true", help="also time the NumPy core (NORMKERNELS_CPU=numpy)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch's intra-op threads (default 2)")
    parser.add_argument("--calibrate", action="store_true", help="one thread vs all, by size; then exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    warm = compiled.warm_up()  # compiling (or loading) the kernels is not part of any case
    if warm is not None:
        print(f"kernels ready in {warm.seconds:.1f} s ({warm.compiled} of {warm.signatures} signatures compiled)")
    if args.calibrate:
        calibrate(0.3)
        return 0
    sizes = QUICK if args.quick else SIZES
    min_time, rounds = (0.01, 2) if args.quick else (args.min_time, args.rounds)
    rng = np.random.default_rng(0)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    copies = {label: copy_bandwidth(nbytes, min_time) for label, nbytes in COPY_BYTES.items()}
    for label, gbps in copies.items():
        print(
            f"plain copy, {label} ({COPY_BYTES[label] >> 10} KiB): {gbps['new array']:.1f} GB/s into a new array, "
            f"{gbps['used array']:.1f} into a used one"
        )

    rows = []
    header = f"{'kind':<14}{'shape':<16}{'op':<15}{'ours ms':>9}{'torch ms':>9}{'ratio':>7}"
    header += f"{'numpy ms':>9}{'np ratio':>9}" if args.numpy else ""
    header += f"{'GB/s':>7}{'/copy':>7}"
    print(header)
    print("-" * len(header))
    for kind in args.kinds:
        for label, cfg, shape in sizes[kind]:
            nbytes = 4 * math.prod(shape)
            for op, fns in callables(kind, cfg, shape, rng, args.numpy).items():
                times = time_all(fns, min_time, rounds)
                t_numba, t_torch = times[0], times[-1]
                moved = bytes_moved(kind, op, nbytes)
                row = {
                    "kind": kind,
                    "size": label,
                    "shape": list(shape),
                    "op": op,
                    "ours_ms": t_numba * 1e3,
                    "torch_ms": t_torch * 1e3,
                    "ratio": t_numba / t_torch,
                    "bytes_moved": moved,
                    "gbps": moved / t_numba / 1e9,
                    "copy_fraction": moved / t_numba / 1e9 / copies[label]["new array"],
                }
                line = f"{kind:<14}{'x'.join(map(str, shape)):<16}{op:<15}{row['ours_ms']:>9.3f}{row['torch_ms']:>9.3f}"
                line += f"{row['ratio']:>7.2f}"
                if args.numpy:
                    row.update(numpy_ms=times[1] * 1e3, numpy_ratio=times[1] / t_torch)
                    line += f"{row['numpy_ms']:>9.3f}{row['numpy_ratio']:>9.2f}"
                rows.append(row)
                print(line + f"{row['gbps']:>7.1f}{row['copy_fraction']:>7.2f}", flush=True)
    summary = _print_summary(rows)
    end_load = os.getloadavg()
    print(f"load average at the end {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine(),
        "load_average": [*load, *end_load],  # at the start, then at the end
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
