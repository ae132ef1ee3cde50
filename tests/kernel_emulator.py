"""A NumPy emulation of normkernels/cuda/normalization.cu, for CPU tests of normkernels.fused.

It implements the kernels' contract element by element: which block (split,
column) owns each element, the IndexMap, the partial states, the merge order
and the output layout. That way the geometry and the per-statistic math in
``normkernels.fused`` are tested without a GPU. The kernel bodies themselves
run on the CPU through tests/cudasim, and on a GPU in tests/test_gpu_fused.py.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from normkernels.fused import FIELDS, Elementwise, IndexMap, Reduction


def load(a: np.ndarray, acc: np.dtype) -> np.ndarray:
    """Stored values as the accumulator dtype (uint16 arrays are bfloat16 bit patterns)."""
    if a.dtype == np.uint16:
        return a.view(ml_dtypes.bfloat16).astype(acc)
    return a.astype(acc)


def store(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.dtype == np.uint16:
        return values.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return values.astype(np.float32 if like.dtype == np.float16 else like.dtype).astype(like.dtype)


class NumpyLauncher:
    """Drop-in for fused.CudaLauncher on NumPy arrays; records the launches it was asked for."""

    def __init__(self, sm_count: int) -> None:
        self.sm_count = sm_count
        self.launches: list[str] = []

    # ------------------------------------------------------------------ reductions
    def reduce(self, op: str, plan: Reduction, x: np.ndarray, dy: np.ndarray | None = None, **o: Any) -> np.ndarray:
        self.launches.append(f"reduce_{'cols' if plan.columns else 'rows'}_{op}")
        acc = np.dtype(o["dtype"])
        A, B, K = plan.A, plan.B, plan.K
        assert x.size == A * B * K, "the reduction must cover x exactly"
        e = np.arange(x.size)
        line, k = e // K, e % K
        a, b = line // B, line % B
        # Which block owns an element: exactly the kernels' loops.
        if plan.columns:
            assert plan.grid[0] * 32 >= B * K
            assert plan.grid[1] == plan.splits
            split, kp, width = a // plan.chunk, k, K
        else:
            assert plan.grid[0] == plan.splits
            assert plan.grid[1] >= 1
            split, kp, width = (a * K + k) // plan.chunk, np.zeros_like(k), 1
        assert split.max() < plan.splits
        key = (split * B + b) * width + kp
        size = plan.partials
        xv = load(x.reshape(-1), acc)
        if op == "grad_sums":
            s = plan.map.stat(line)
            mean = 0.0 if o.get("mean") is None else o["mean"][s]
            xhat = (xv - mean) / np.sqrt(o["var"][s] + o["eps"])
            d = load(dy.reshape(-1), acc)
            state = [np.bincount(key, d, size), np.bincount(key, d * xhat, size)]
        else:
            g = None
            if op != "moments":
                g = load(dy.reshape(-1), acc)
                if op == "comoments_weighted":
                    g = g * o["weight"][plan.map.param(line, k)]
            state = _welford_partials(key, xv, g, size)
        assert len(state) == FIELDS[op]
        return _merge(op, [f.reshape(plan.splits, B, width) for f in state], acc)

    # ------------------------------------------------------------------ elementwise
    def _operands(self, x: np.ndarray, ew: Elementwise, imap: IndexMap, o: dict) -> tuple:
        assert ew.lines * ew.K == x.size
        if ew.flat:
            assert ew.grid[1] == 1
        else:
            assert ew.grid[1] >= 1
            assert ew.grid[0] >= 1
        e = np.arange(x.size)
        line, k = e // ew.K, e % ew.K
        s, p = imap.stat(line), imap.param(line, k)
        acc = np.dtype(o["dtype"])
        mean = 0.0 if o.get("mean") is None else o["mean"][s]
        rstd = (1 / np.sqrt(o["var"] + acc.type(o["eps"])))[s]
        w = 1.0 if o.get("weight") is None else o["weight"][p]
        return acc, mean, rstd, w, p, s

    def normalize(self, x: np.ndarray, y: np.ndarray, ew: Elementwise, imap: IndexMap, **o: Any) -> None:
        self.launches.append("normalize")
        self._normalize(x, y, ew, imap, o)

    def _normalize(self, x: np.ndarray, y: np.ndarray, ew: Elementwise, imap: IndexMap, o: dict) -> None:
        acc, mean, rstd, w, p, _ = self._operands(x, ew, imap, o)
        v = (load(x.reshape(-1), acc) - mean) * rstd * w
        if o.get("bias") is not None:
            v = v + o["bias"][p]
        y.reshape(-1)[...] = store(v, y)

    def grad_input(self, x: np.ndarray, dy: np.ndarray, dx: np.ndarray, ew, imap, **o: Any) -> None:
        self.launches.append("grad_input")
        acc, mean, rstd, w, _, s = self._operands(x, ew, imap, o)
        v = load(dy.reshape(-1), acc) * w
        if o.get("c1") is not None:
            v = v - o["c1"][s]
        if o.get("c2") is not None:
            v = v - (load(x.reshape(-1), acc) - mean) * rstd * o["c2"][s]
        dx.reshape(-1)[...] = store(v * rstd, dx)

    def forward_lines(self, x: np.ndarray, y: np.ndarray, ew: Elementwise, imap: IndexMap, **o: Any) -> None:
        self.launches.append("forward_lines")
        acc = np.dtype(o["dtype"])
        rows = load(x.reshape(ew.lines, ew.K), acc)
        mean = rows.mean(axis=1)
        var = ((rows - mean[:, None]) ** 2).mean(axis=1)
        lines = np.arange(ew.lines)
        o["mean_out"][imap.stat(lines)] = mean
        o["var_out"][imap.stat(lines)] = var if o["center"] else var + mean * mean
        stats = dict(o, mean=o["mean_out"] if o["center"] else None, var=o["var_out"])
        self._normalize(x, y, ew, imap, stats)


def _welford_partials(key: np.ndarray, x: np.ndarray, g: np.ndarray | None, size: int) -> list[np.ndarray]:
    """Per block: count, mean, M2 (and mean of g, co-moment), as a Welford pass would leave them."""
    n = np.bincount(key, minlength=size).astype(x.dtype)
    safe = np.maximum(n, 1)
    mx = np.bincount(key, x, size) / safe
    dx = x - mx[key]
    state = [n, mx, np.bincount(key, dx * dx, size)]
    if g is not None:
        mg = np.bincount(key, g, size) / safe
        state += [mg, np.bincount(key, dx * (g - mg[key]), size)]
    return [f.astype(x.dtype) for f in state]


def _merge(op: str, parts: list[np.ndarray], acc: np.dtype) -> np.ndarray:
    """The merge kernel: Chan's formula over [split][kp], in that order, per group."""
    splits, B, width = parts[0].shape
    if op == "grad_sums":
        return np.stack([f.sum(axis=(0, 2)) for f in parts]).astype(acc)
    n, mx, m2 = (np.zeros(B, acc) for _ in range(3))
    mg, c = np.zeros(B, acc), np.zeros(B, acc)
    for s in range(splits):
        for kk in range(width):
            on, omx, om2 = parts[0][s, :, kk], parts[1][s, :, kk], parts[2][s, :, kk]
            total = n + on
            wo = np.divide(on, total, out=np.zeros_like(total), where=total > 0)
            d = omx - mx
            m2 = m2 + om2 + d * d * n * wo
            if len(parts) == 5:
                dg = parts[3][s, :, kk] - mg
                c = c + parts[4][s, :, kk] + d * dg * n * wo
                mg = mg + dg * wo
            mx, n = mx + d * wo, total
    var = np.divide(m2, n, out=np.zeros_like(m2), where=n > 0)
    rows = [mx, var] if len(parts) == 3 else [mx, var, mg * n, c]
    return np.stack(rows).astype(acc)
