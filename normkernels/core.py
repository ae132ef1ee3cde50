"""The one generic normalization core every layer kind uses.

A kind is described by a :class:`Plan`: the input is viewed (a reshape, no
copy) as ``plan.view``; statistics are reduced over the axes where
``plan.stat_shape`` is 1; weight and bias broadcast from ``plan.param_shape``.
For example (N, C, H, W) BatchNorm is view (N, C, H*W), stats (1, C, 1),
params (1, C, 1); LayerNorm over D trailing elements is view (M, D), stats
(M, 1), params (1, D). RMSNorm is LayerNorm with ``center=False``.

Numerics. Statistics use the corrected two-pass algorithm: a first pass gives
a shift (the mean, up to rounding), the data are centered on it, and the
mean of the centered data corrects both the mean and the variance. No
E[x^2] - E[x]^2 on raw data, so a float32 batch with mean 3000 and std 0.1
keeps its variance. Everything runs in ``dtype`` (float32 for float16 and
float32 inputs, float64 for float64), and the caller casts back.

Backward. With xhat = (x - mean) * rstd and g = dy * weight, the gradient
through batch statistics is ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``
(means over each statistic's group); with constant statistics it is
``dx = rstd * g``. Both are written as ``dx = dy * alpha + d * beta + gamma``
with small per-group coefficients, so dx costs three elementwise passes.

Speed. Large NumPy inputs whose statistics are independent along axis 0
(every kind but batch norm; any kind with constant statistics) run one
cache-sized block of rows at a time, so each pass of the math re-reads the
block from cache rather than from memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from normkernels.backend import Array, array_module, dot_to, sum_to


@dataclass(frozen=True)
class Plan:
    """How one input shape maps onto the generic math."""

    view: tuple[int, ...]
    stat_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    center: bool = True

    @functools.cached_property
    def count(self) -> int:
        """Elements behind each statistic."""
        return math.prod(self.view) // math.prod(self.stat_shape)

    @functools.cached_property
    def joint_shape(self) -> tuple[int, ...]:
        """Finest grid on which both statistics and parameters are constant."""
        return tuple(max(s, p) for s, p in zip(self.stat_shape, self.param_shape, strict=True))

    @functools.cached_property
    def folds(self) -> bool:
        """Statistics and parameters vary on a grid coarser than x: fold them into one scale."""
        return math.prod(self.joint_shape) < math.prod(self.view)

    @functools.cached_property
    def rows_independent(self) -> bool:
        """Each slice along axis 0 has its own statistics (all kinds but batch norm)."""
        return self.stat_shape[0] == self.view[0] and self.param_shape[0] == 1

    def with_rows(self, rows: int) -> Plan:
        """The plan for a block of ``rows`` slices along axis 0."""
        stat = (rows, *self.stat_shape[1:]) if self.stat_shape[0] != 1 else self.stat_shape
        return replace(self, view=(rows, *self.view[1:]), stat_shape=stat)


class Moments(NamedTuple):
    """Batch statistics in ``plan.stat_shape`` (compute dtype)."""

    mean: Array | None  # None for RMS norm (no centering)
    var: Array  # biased variance; mean square for RMS norm


class CheckedMoments(Moments):
    """Batch statistics already found finite by what made them (a compiled kernel, or the checks of a batch
    given as its statistics): the layer need not check them again."""

    __slots__ = ()
    checked_finite = True


class Centered(NamedTuple):
    d: Array  # x - shift, a new array the caller may overwrite (x itself, read only, for RMS norm)
    offset: Array | float  # mean(d): the shift's rounding error
    moments: Moments


def _center(xv: Array, plan: Plan, dtype: np.dtype, out: Array | None = None) -> Centered:
    """Center ``xv`` and compute its moments (corrected two-pass).

    When centering, ``d`` is a new array (``out`` if given) the caller may
    overwrite; RMS norm does not center and ``d`` is ``xv`` itself (read only).
    """
    xp = array_module(xv)
    n = plan.count
    if not plan.center:
        d = xv.astype(dtype, copy=False)
        return Centered(d, 0.0, Moments(None, dot_to(d, d, plan.stat_shape) / n))
    shift = sum_to(xv.astype(dtype, copy=False), plan.stat_shape) / n
    d = xp.subtract(xv, shift, dtype=dtype, out=out)
    offset = sum_to(d, plan.stat_shape) / n
    var = xp.maximum(dot_to(d, d, plan.stat_shape) / n - offset * offset, 0)
    return Centered(d, offset, Moments(shift + offset, var))


def rstd(var: Array, eps: float) -> Array:
    """1 / sqrt(var + eps), in var's dtype."""
    return 1.0 / array_module(var).sqrt(var + eps)


def _scaled_into(a: Array, rstd: Array, weight: Array | None, plan: Plan, out: Array) -> Array:
    """``out = a * rstd * weight``, folding ``rstd * weight`` when that product is small."""
    xp = array_module(a)
    if weight is None:
        return xp.multiply(a, rstd, out=out)
    if plan.folds:
        return xp.multiply(a, rstd * weight, out=out)
    xp.multiply(a, weight, out=out)
    return xp.multiply(out, rstd, out=out)


def _normalize_into(
    d: Array,
    offset: Array | float,
    rstd: Array,
    weight: Array | None,
    bias: Array | None,
    plan: Plan,
    out: Array,
) -> Array:
    """``out = (d - offset) * rstd * weight + bias``; ``out`` may be ``d``."""
    xp = array_module(d)
    if plan.folds:
        # Statistics and parameters share a grid coarser than x (batch,
        # instance, group norm): one scale and one shift per grid cell.
        scale = rstd if weight is None else rstd * weight
        xp.multiply(d, scale, out=out)
        shift = -offset * scale if plan.center else None
        if bias is not None:
            shift = bias if shift is None else shift + bias
        return out if shift is None else xp.add(out, shift, out=out)
    # Per-row statistics, per-column parameters (layer/RMS norm): their outer
    # product would be as large as x, so apply the factors one after another.
    # The offset (the first pass's rounding error) gets a pass of its own only
    # when it shifts xhat by more than half an ulp of 1; usually it does not.
    if plan.center and float(xp.max(xp.abs(offset * rstd))) > np.finfo(out.dtype).eps / 2:
        d = xp.subtract(d, offset, out=out)
    _scaled_into(d, rstd, weight, plan, out=out)
    return out if bias is None else xp.add(out, bias, out=out)


def _forward_train(
    xv: Array,
    plan: Plan,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: np.dtype,
    out: Array | None = None,
) -> tuple[Array, Moments]:
    d, offset, stats = _center(xv, plan, dtype, out=out)
    if out is None:
        out = d if plan.center else array_module(xv).empty(plan.view, dtype=dtype)
    return _normalize_into(d, offset, rstd(stats.var, eps), weight, bias, plan, out), stats


def forward_train(
    xv: Array, plan: Plan, weight: Array | None, bias: Array | None, eps: float, dtype: np.dtype
) -> tuple[Array, Moments]:
    """Normalize with the batch's own statistics; returns y (in ``dtype``) and the moments."""
    blocks = _row_blocks(xv, plan, dtype) if plan.rows_independent else None
    if blocks is None:
        return _forward_train(xv, plan, weight, bias, eps, dtype)
    y, parts = _run_blocks(
        blocks, plan, dtype, lambda rows, block, out: _forward_train(xv[rows], block, weight, bias, eps, dtype, out)[1]
    )
    mean = None if parts[0].mean is None else np.concatenate([p.mean for p in parts])
    return y, Moments(mean, np.concatenate([p.var for p in parts]))


def forward_eval(
    xv: Array,
    plan: Plan,
    stats: Moments,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: np.dtype,
) -> Array:
    """Normalize with given per-channel (running) statistics: one scale and one shift."""
    xp = array_module(xv)
    scale = rstd(stats.var.astype(dtype, copy=False), eps)
    if weight is not None:
        scale = scale * weight
    shift = 0.0 if stats.mean is None else -stats.mean.astype(dtype, copy=False) * scale
    if bias is not None:
        shift = shift + bias
    y = xp.empty(plan.view, dtype=dtype)

    # Two passes per block, the second while the block is still in cache.
    for rows in _row_blocks(xv, plan, dtype) or [slice(None)]:
        xp.multiply(xv[rows], scale, out=y[rows])
        xp.add(y[rows], shift, out=y[rows])
    return y


def backward(
    xv: Array,
    dyv: Array,
    plan: Plan,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
    stats: Moments | None = None,
) -> tuple[Array, Array, Array]:
    """Gradients ``(dx, dweight, dbias)`` of ``sum(y * dy)``, all in ``dtype``.

    ``stats=None`` is training mode: the statistics are the batch's own and
    are differentiated through. Given ``stats`` are constants (eval mode with
    running statistics). dweight and dbias come in ``plan.param_shape``.
    """
    blocks = _row_blocks(xv, plan, dtype) if plan.rows_independent or stats is not None else None
    if blocks is None:
        return _backward(xv, dyv, plan, weight, eps, dtype, stats)
    dx, parts = _run_blocks(
        blocks,
        plan,
        dtype,
        lambda rows, block, out: _backward(xv[rows], dyv[rows], block, weight, eps, dtype, stats, out),
    )
    return dx, sum(p[1] for p in parts), sum(p[2] for p in parts)


def _backward(
    xv: Array,
    dyv: Array,
    plan: Plan,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
    stats: Moments | None,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    centered, sums = grad_sums(xv, dyv, plan, dtype, stats)
    return grad_input(centered, dyv, plan, weight, eps, dtype, sums, training=stats is None, out=out)


class GradSums(NamedTuple):
    """What the backward pass reduces x and dy to, per cell of ``plan.joint_shape``."""

    count: int  # elements behind each statistic
    moments: Moments  # of x: the batch's own, or the given constant ones
    sum_dy: Array
    sum_dy_xmu: Array  # sum(dy * (x - mean)); sum(dy * x) without centering


def grad_sums(
    xv: Array, dyv: Array, plan: Plan, dtype: np.dtype, stats: Moments | None = None
) -> tuple[Centered, GradSums]:
    """The backward pass's reductions: x centered (kept for :func:`grad_input`) and the sums.

    ``stats=None`` centers on the batch's own moments; given ``stats`` are constants.
    """
    xp = array_module(xv)
    if stats is None:
        centered = _center(xv, plan, dtype)
    else:
        d = xp.subtract(xv, stats.mean, dtype=dtype) if plan.center else xv.astype(dtype, copy=False)
        centered = Centered(d, 0.0, stats)
    dyv = dyv.astype(dtype, copy=False)
    joint = plan.joint_shape
    sum_dy = sum_to(dyv, joint)
    sum_dy_xmu = dot_to(dyv, centered.d, joint)
    if plan.center:
        sum_dy_xmu = sum_dy_xmu - centered.offset * sum_dy
    return centered, GradSums(plan.count, centered.moments, sum_dy, sum_dy_xmu)


def grad_input(
    centered: Centered,
    dyv: Array,
    plan: Plan,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
    sums: GradSums,
    training: bool,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    """``(dx, dweight, dbias)`` from :func:`grad_sums`' results; overwrites ``centered.d``.

    ``training`` differentiates through the statistics ``sums.moments`` of
    ``sums.count`` elements each; ``centered.d - centered.offset`` is x minus
    their mean. (Synchronized batch norm passes sums combined over workers.)
    """
    xp = array_module(dyv)
    dyv = dyv.astype(dtype, copy=False)
    scale = rstd(sums.moments.var.astype(dtype, copy=False), eps)
    sum_dy_xhat = scale * sums.sum_dy_xmu
    dweight = sum_to(sum_dy_xhat, plan.param_shape)
    dbias = sum_to(sums.sum_dy, plan.param_shape)

    dx = _scaled_into(dyv, scale, weight, plan, out=xp.empty(plan.view, dtype=dtype) if out is None else out)
    if training:
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight,
        # xhat = (d - offset) * scale: the last two terms are d * beta + gamma.
        d, offset = centered.d, centered.offset
        n = sums.count
        mean_g_xhat = _weighted_sum(sum_dy_xhat, weight, plan.stat_shape) / n
        beta = -scale * scale * mean_g_xhat
        xp.add(dx, xp.multiply(d, beta, out=d if plan.center else None), out=dx)
        if plan.center:
            mean_g = _weighted_sum(sums.sum_dy, weight, plan.stat_shape) / n
            xp.add(dx, scale * (scale * mean_g_xhat * offset - mean_g), out=dx)
    return dx, dweight, dbias


def moments(xv: Array, plan: Plan, dtype: np.dtype) -> Moments:
    """The batch statistics of ``xv`` alone (no output)."""
    return _center(xv, plan, dtype).moments


def _weighted_sum(a: Array, weight: Array | None, shape: tuple[int, ...]) -> Array:
    return sum_to(a, shape) if weight is None else dot_to(a, weight, shape)


#: Bytes of input per block: a block's temporaries stay in a core's L2 cache.
_BLOCK_BYTES = 1 << 19


def _row_blocks(xv: Array, plan: Plan, dtype: np.dtype) -> list[slice] | None:
    """Slices along axis 0 for blocked NumPy execution (None: run on the whole array).

    Large arrays are processed a cache-sized block at a time, so that every
    pass of the math re-reads the block from cache instead of memory: NumPy's
    way, pass by pass, of approaching a fused kernel. (Threads do not pay
    here: NumPy calls on cache-sized blocks are too short to amortize the GIL
    hand-off.) CuPy always runs on the whole array.
    """
    if not isinstance(xv, np.ndarray):
        return None
    rows = plan.view[0]
    row_bytes = math.prod(plan.view[1:]) * np.dtype(dtype).itemsize
    if rows < 2 or rows * row_bytes < 4 * _BLOCK_BYTES:
        return None
    per = max(1, _BLOCK_BYTES // row_bytes)
    return [slice(i, min(i + per, rows)) for i in range(0, rows, per)]


def _run_blocks(
    blocks: list[slice], plan: Plan, dtype: np.dtype, step: Callable[[slice, Plan, Array], tuple]
) -> tuple[np.ndarray, list[tuple]]:
    """Run ``step(rows, block_plan, out_block)`` over the blocks into one new output; results in order."""
    out = np.empty(plan.view, dtype=dtype)
    return out, [step(rows, plan.with_rows(rows.stop - rows.start), out[rows]) for rows in blocks]
