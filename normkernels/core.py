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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from normkernels.backend import Array, _xp, dot_to, sum_to


@dataclass(frozen=True)
class Plan:
    """How one input shape maps onto the generic math."""

    view: tuple[int, ...]
    stat_shape: tuple[int, ...]
    param_shape: tuple[int, ...]
    center: bool = True

    @property
    def count(self) -> int:
        """Elements behind each statistic."""
        return math.prod(self.view) // math.prod(self.stat_shape)

    @property
    def joint_shape(self) -> tuple[int, ...]:
        """Finest grid on which both statistics and parameters are constant."""
        return tuple(max(s, p) for s, p in zip(self.stat_shape, self.param_shape, strict=False))

    @property
    def folds(self) -> bool:
        """Statistics and parameters vary on a grid coarser than x: fold them into one scale."""
        return math.prod(self.joint_shape) < math.prod(self.view)


class Moments(NamedTuple):
    """Batch statistics in ``plan.stat_shape`` (compute dtype)."""

    mean: Array | None  # None for RMS norm (no centering)
    var: Array  # biased variance; mean square for RMS norm


class _Centered(NamedTuple):
    d: Array  # x - shift, a fresh array the caller may overwrite (x itself when not centering)
    offset: Array | float  # mean(d): the shift's rounding error
    moments: Moments


def _center(xv: Array, plan: Plan, dtype: np.dtype, fresh: bool) -> _Centered:
    """Center ``xv`` and compute its moments (corrected two-pass)."""
    xp = _xp(xv)
    n = plan.count
    if not plan.center:
        d = xp.array(xv, dtype=dtype, copy=True) if fresh else xv.astype(dtype, copy=False)
        return _Centered(d, 0.0, Moments(None, dot_to(d, d, plan.stat_shape) / n))
    shift = sum_to(xv.astype(dtype, copy=False), plan.stat_shape) / n
    d = xp.subtract(xv, shift, dtype=dtype)
    offset = sum_to(d, plan.stat_shape) / n
    var = xp.maximum(dot_to(d, d, plan.stat_shape) / n - offset * offset, 0)
    return _Centered(d, offset, Moments(shift + offset, var))


def moments(xv: Array, plan: Plan, dtype: np.dtype) -> Moments:
    """Batch mean and biased variance of ``xv`` over the plan's statistic groups."""
    return _center(xv, plan, dtype, fresh=False).moments


def _rstd(var: Array, eps: float) -> Array:
    return 1.0 / _xp(var).sqrt(var + eps)


def _scaled_into(a: Array, rstd: Array, weight: Array | None, plan: Plan, out: Array) -> Array:
    """``out = a * rstd * weight``, folding ``rstd * weight`` when that product is small."""
    xp = _xp(a)
    if weight is None:
        return xp.multiply(a, rstd, out=out)
    if plan.folds:
        return xp.multiply(a, rstd * weight, out=out)
    xp.multiply(a, weight, out=out)
    return xp.multiply(out, rstd, out=out)


def _normalize_into(
    d: Array, offset: Array | float, rstd: Array, weight: Array | None, bias: Array | None, plan: Plan
) -> Array:
    """Overwrite ``d`` (data minus a shift) with ``(d - offset) * rstd * weight + bias``."""
    xp = _xp(d)
    if plan.folds:
        # Statistics and parameters share a grid coarser than x (batch,
        # instance, group norm): one scale and one shift per grid cell.
        scale = rstd if weight is None else rstd * weight
        xp.multiply(d, scale, out=d)
        shift = -offset * scale if plan.center else None
        if bias is not None:
            shift = bias if shift is None else shift + bias
        return d if shift is None else xp.add(d, shift, out=d)
    # Per-row statistics, per-column parameters (layer/RMS norm): their outer
    # product would be as large as x, so apply the factors one after another.
    if plan.center:
        xp.subtract(d, offset, out=d)
    _scaled_into(d, rstd, weight, plan, out=d)
    return d if bias is None else xp.add(d, bias, out=d)


def forward_train(
    xv: Array, plan: Plan, weight: Array | None, bias: Array | None, eps: float, dtype: np.dtype
) -> tuple[Array, Moments]:
    """Normalize with the batch's own statistics; returns y (in ``dtype``) and the moments."""
    d, offset, stats = _center(xv, plan, dtype, fresh=True)
    y = _normalize_into(d, offset, _rstd(stats.var, eps), weight, bias, plan)
    return y, stats


def forward_eval(
    xv: Array,
    plan: Plan,
    stats: Moments,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: np.dtype,
) -> Array:
    """Normalize with given (running) statistics, per channel: one scale and one shift."""
    xp = _xp(xv)
    scale = _rstd(stats.var.astype(dtype, copy=False), eps)
    if weight is not None:
        scale = scale * weight
    shift = 0.0 if stats.mean is None else -stats.mean.astype(dtype, copy=False) * scale
    if bias is not None:
        shift = shift + bias
    y = xp.multiply(xv, scale, dtype=dtype)
    return xp.add(y, shift, out=y)


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
    xp = _xp(xv)
    dyv = dyv.astype(dtype, copy=False)
    training = stats is None
    if training:
        d, offset, stats = _center(xv, plan, dtype, fresh=True)
    else:
        offset = 0.0
        d = xp.subtract(xv, stats.mean, dtype=dtype) if plan.center else xv.astype(dtype, copy=False)
    rstd = _rstd(stats.var.astype(dtype, copy=False), eps)

    joint = plan.joint_shape
    sum_dy = sum_to(dyv, joint)
    sum_dy_d = dot_to(dyv, d, joint)
    if plan.center:
        sum_dy_d = sum_dy_d - offset * sum_dy
    sum_dy_xhat = rstd * sum_dy_d
    dweight = sum_to(sum_dy_xhat, plan.param_shape)
    dbias = sum_to(sum_dy, plan.param_shape)

    dx = _scaled_into(dyv, rstd, weight, plan, out=xp.empty(plan.view, dtype=dtype))
    if training:
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight,
        # xhat = (d - offset) * rstd: the last two terms are d * beta + gamma.
        n = plan.count
        mean_g_xhat = _weighted_sum(sum_dy_xhat, weight, plan.stat_shape) / n
        beta = -rstd * rstd * mean_g_xhat
        xp.add(dx, xp.multiply(d, beta, out=d), out=dx)
        if plan.center:
            mean_g = _weighted_sum(sum_dy, weight, plan.stat_shape) / n
            xp.add(dx, rstd * (rstd * mean_g_xhat * offset - mean_g), out=dx)
    return dx, dweight, dbias


def _weighted_sum(a: Array, weight: Array | None, shape: tuple[int, ...]) -> Array:
    return sum_to(a, shape) if weight is None else dot_to(a, weight, shape)
