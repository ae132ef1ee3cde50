"""Fused CUDA kernels vs torch CUDA, and vs the device's copy bandwidth.

Every kind x {train forward, eval forward, backward} at sizes from ~8 MB to
a few hundred MB (float32), on the same device tensors (torch wraps CuPy's
memory through DLPack, no copy), with the same state. Each case is timed
with CUDA events around single calls; the median of the repeats is
reported. Ours is the kernel path the layers use (``normkernels.fused``);
torch's backward is ``autograd.grad`` through a retained graph (only its
backward kernels), ours recomputes the statistics from x as the Gradient RPC
does.

Effective bandwidth counts the bytes a call must move at least: x in and y
out for forwards, x and dy in and dx out for backward. It is compared with a
device-to-device copy measured in the same run (``dst[...] = src``, read +
write). Goals: no case slower than torch; large tensors at >= 80% of the
copy bandwidth.

    python benchmarks/gpu.py                # full table; JSON and PNG in benchmarks/out/
    python benchmarks/gpu.py --quick        # small shapes, a smoke test

Without CuPy, a CUDA device, or a CUDA build of torch it measures nothing
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

import normkernels as nk
from normkernels import fused

SIZES = {
    "batch_norm": [
        ("8 MB", {"num_features": 64}, (32, 64, 32, 32)),
        ("103 MB", {"num_features": 64}, (128, 64, 56, 56)),
        ("411 MB", {"num_features": 128}, (256, 128, 56, 56)),
        ("(N, C) 64 MB", {"num_features": 1024}, (16384, 1024)),
    ],
    "instance_norm": [
        ("8 MB", {"num_features": 64, "affine": True}, (32, 64, 32, 32)),
        ("103 MB", {"num_features": 64, "affine": True}, (128, 64, 56, 56)),
        ("411 MB", {"num_features": 128, "affine": True}, (256, 128, 56, 56)),
    ],
    "group_norm": [
        ("8 MB", {"num_groups": 32, "num_channels": 64}, (32, 64, 32, 32)),
        ("103 MB", {"num_groups": 32, "num_channels": 64}, (128, 64, 56, 56)),
        ("411 MB", {"num_groups": 32, "num_channels": 128}, (256, 128, 56, 56)),
    ],
    "layer_norm": [
        ("8 MB", {"normalized_shape": 1024}, (2048, 1024)),
        ("128 MB", {"normalized_shape": 4096}, (8192, 4096)),
        ("512 MB", {"normalized_shape": 8192}, (16384, 8192)),
    ],
    "rms_norm": [
        ("8 MB", {"normalized_shape": 1024}, (2048, 1024)),
        ("128 MB", {"normalized_shape": 4096}, (8192, 4096)),
        ("512 MB", {"normalized_shape": 8192}, (16384, 8192)),
    ],
}
QUICK = {
    "batch_norm": [("1 MB", {"num_features": 16}, (16, 16, 32, 32))],
    "instance_norm": [("1 MB", {"num_features": 16, "affine": True}, (16, 16, 32, 32))],
    "group_norm": [("1 MB", {"num_groups": 4, "num_channels": 16}, (16, 16, 32, 32))],
    "layer_norm": [("1 MB", {"normalized_shape": 512}, (512, 512))],
    "rms_norm": [("1 MB", {"normalized_shape": 512}, (512, 512))],
}
#: Bytes moved per byte of x: forwards read x and write y; backward reads x and dy and writes dx.
TRAFFIC = {"train forward": 2, "eval forward": 2, "backward": 3}
LARGE_BYTES = 100 << 20


def missing_requirements() -> str | None:
    """Why this machine cannot run the benchmark (None when it can)."""
    try:
        import cupy  # noqa: F401
        import torch
    except ImportError as exc:
        return f"needs CuPy and torch ({exc.name} is not installed)"
    if nk.cuda_device_count() == 0:
        return "needs a CUDA device (CuPy sees none)"
    if not torch.cuda.is_available():
        return "needs a CUDA build of torch (torch.cuda.is_available() is False)"
    return None


def cuda_median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` between two CUDA events, after a warm-up call."""
    import cupy

    fn()
    cupy.cuda.Device().synchronize()
    times = []
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), as ``dst[...] = src``."""
    import cupy

    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    return 2 * nbytes / (cuda_median_ms(lambda: dst.__setitem__(Ellipsis, src), repeats) / 1e3)


def cases(kind: str, cfg: dict, shape: tuple[int, ...], rng: np.random.Generator) -> dict:
    """op -> (ours, torch's) callables on the same device tensors."""
    import cupy
    import torch
    from kernels import torch_module

    layer = nk.make_layer(kind, **cfg, device="cuda:0")
    module = torch_module(nk.make_layer(kind, **cfg), len(shape)).cuda()
    plan = layer._plan(shape)
    f32 = np.dtype(np.float32)
    weight, bias = layer._params(plan, f32)
    eps = layer._eps_for(f32)
    x = cupy.asarray(rng.normal(1.0, 2.0, shape).astype(np.float32))
    dy = cupy.asarray(rng.normal(size=shape).astype(np.float32))
    xv, dyv = x.reshape(plan.view), dy.reshape(plan.view)
    running = layer._running_moments(plan) if layer.track_running_stats else None
    xt, dyt = torch.from_dlpack(x), torch.from_dlpack(dy)
    xt_grad = xt.detach().clone().requires_grad_(True)
    module.train(True)
    graph = module(xt_grad)
    inputs = [xt_grad, *(p for p in module.parameters())]

    def torch_forward(training: bool):
        module.train(training)
        with torch.no_grad():
            return module(xt)

    def ours_eval():
        if running is None:  # no running statistics: eval normalizes with the batch's own
            return fused.forward_train(xv, plan, weight, bias, eps, f32)
        return fused.forward_eval(xv, plan, running, weight, bias, eps, f32)

    return {
        "train forward": (lambda: fused.forward_train(xv, plan, weight, bias, eps, f32), lambda: torch_forward(True)),
        "eval forward": (ours_eval, lambda: torch_forward(False)),
        "backward": (
            lambda: fused.backward(xv, dyv, plan, weight, eps, f32),
            lambda: torch.autograd.grad(graph, inputs, dyt, retain_graph=True),
        ),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 6))
    labels = [f"{r['kind']} {r['size']}\n{r['op']}" for r in rows]
    ys = range(len(rows))
    left.barh(ys, [r["ratio_vs_torch"] for r in rows], color="tab:blue")
    left.axvline(1.0, color="black", lw=1)
    left.set(yticks=list(ys), yticklabels=labels, xlabel="time ours / torch (below 1: faster)", xscale="log")
    right.barh(ys, [r["fraction_of_copy"] for r in rows], color="tab:green")
    right.axvline(0.8, color="black", lw=1, ls="--")
    right.set(yticks=list(ys), yticklabels=[], xlabel="effective bandwidth / device copy bandwidth")
    for axis in (left, right):
        axis.invert_yaxis()
        axis.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per case (default 30)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "gpu.json")
    parser.add_argument("--plot", type=Path, default=Path(__file__).parent / "out" / "gpu.png")
    args = parser.parse_args(argv)
    missing = missing_requirements()
    if missing:
        print(f"benchmarks/gpu.py {missing}: nothing measured", file=sys.stderr)
        return 2
    import cupy
    import torch

    repeats = 5 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    bandwidth = copy_bandwidth(64 << 20 if args.quick else 1 << 30, repeats)
    rows = []
    header = (
        f"{'kind':<14}{'size':<14}{'op':<15}{'ours ms':>10}{'torch ms':>10}{'ours/torch':>11}{'GB/s':>8}{'of copy':>9}"
    )
    print(f"device copy bandwidth: {bandwidth / 1e9:.0f} GB/s\n{header}")
    for kind, sizes in (QUICK if args.quick else SIZES).items():
        for label, cfg, shape in sizes:
            nbytes = int(np.prod(shape)) * 4
            for op, (ours, theirs) in cases(kind, cfg, shape, rng).items():
                ours_ms, torch_ms = cuda_median_ms(ours, repeats), cuda_median_ms(theirs, repeats)
                effective = TRAFFIC[op] * nbytes / (ours_ms / 1e3)
                row = {
                    "kind": kind,
                    "size": label,
                    "shape": list(shape),
                    "op": op,
                    "ours_ms": ours_ms,
                    "torch_ms": torch_ms,
                    "ratio_vs_torch": ours_ms / torch_ms,
                    "effective_gbps": effective / 1e9,
                    "fraction_of_copy": effective / bandwidth,
                    "large": nbytes >= LARGE_BYTES,
                }
                rows.append(row)
                print(
                    f"{kind:<14}{label:<14}{op:<15}{ours_ms:>10.3f}{torch_ms:>10.3f}{row['ratio_vs_torch']:>11.2f}"
                    f"{row['effective_gbps']:>8.0f}{row['fraction_of_copy']:>9.0%}"
                )
            cupy.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
    slower = [r for r in rows if r["ratio_vs_torch"] > 1.0]
    large = [r["fraction_of_copy"] for r in rows if r["large"]]
    summary = {
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "cases_slower_than_torch": len(slower),
        "median_ratio_vs_torch": statistics.median(r["ratio_vs_torch"] for r in rows),
        "large_min_fraction_of_copy": min(large) if large else None,
    }
    print(f"\n{summary}")
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    machine = {
        "device": device,
        "python": platform.python_version(),
        "cupy": cupy.__version__,
        "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "summary": summary, "rows": rows}, indent=2))
    plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
