"""Statistics mode: a batch as per-group statistics, and the math that finishes it with statistics given.

The pieces torch.nn.SyncBatchNorm is made of, for any kind, on NumPy and
CuPy. A worker reduces its batch to a count and each group's mean and
biased variance (:func:`batch_statistics`, on its own device, then float64
on the host); statistics combined elsewhere (by :mod:`normkernels.distributed`,
by a server) come back, and the worker normalizes with them
(:func:`normalize`). In backward it reduces dy to two sums per group
(:func:`gradient_sums`), which are combined the same way, and finishes dx
(:func:`finish_backward`). A group is what one statistic covers: a channel
for batch norm, a sample's channel for instance norm, a sample's group for
group norm, a row for layer and RMS norm; arrays keep the layer's statistics
shape for its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from normkernels import core, distributed
from normkernels.backend import Array, on_device, sum_to
from normkernels.base import _NormBase

__all__ = ["PendingBackward", "batch_statistics", "finish_backward", "gradient_sums", "normalize"]


@dataclass(frozen=True)
class PendingBackward:
    """A worker's backward between its sums and the combined ones."""

    shape: tuple[int, ...]
    input_dtype: np.dtype
    plan: core.Plan
    dtype: np.dtype
    dyv: Array
    centered: core.Centered


def batch_statistics(layer: _NormBase, x: Any) -> core.GradSums:
    """The count and per-group moments of ``x`` (this worker's part of a batch), float64 on the host.

    A part may hold a single value per group: the rule that batch statistics
    need more than one applies to the combined batch.
    """
    x, _, plan, dtype, _ = layer._prepare(x, True, whole_batch=False)
    with on_device(layer.device):
        moments = layer._math.moments(x.reshape(plan.view), plan, dtype)
        layer._check_finite(moments)
    return distributed.on_host(core.GradSums(plan.count, moments, None, None))


def normalize(layer: _NormBase, x: Any, statistics: core.GradSums) -> Array:
    """The training-mode output for ``x``, normalized with the given (combined) statistics."""
    x, _, plan, dtype, _ = layer._prepare(x, True, whole_batch=False)
    with on_device(layer.device):
        moments = (
            None if a is None else layer.xp.asarray(a, dtype=dtype).reshape(plan.stat_shape) for a in statistics.moments
        )
        weight, bias = layer._params(plan, dtype)
        eps = layer._eps_for(dtype)
        # The compiled and fused eval kernels index statistics as they index running statistics, per
        # parameter: statistics of another shape (per sample, per row) take the generic code.
        math = layer._math if plan.stat_shape == plan.param_shape else core
        y = math.forward_eval(x.reshape(plan.view), plan, core.Moments(*moments), weight, bias, eps, dtype)
        return y.reshape(x.shape).astype(x.dtype, copy=False)


def gradient_sums(layer: _NormBase, x: Any, dy: Any) -> tuple[core.GradSums, PendingBackward]:
    """This worker's backward sums about its own mean (float64, host), and what finishes its dx."""
    x, dy, plan, dtype, _ = layer._prepare(x, True, dy, whole_batch=False)
    with on_device(layer.device):
        dyv = dy.reshape(plan.view)
        centered, sums = layer._math.grad_sums(x.reshape(plan.view), dyv, plan, dtype)
        layer._check_finite(sums.moments)
    return distributed.on_host(sums), PendingBackward(x.shape, x.dtype, plan, dtype, dyv, centered)


def finish_backward(
    layer: _NormBase, pending: PendingBackward, part: core.GradSums, total: core.GradSums
) -> tuple[Array, dict[str, Array | None]]:
    """This worker's dx (through the combined statistics) and its own share of dweight and dbias.

    As in torch.nn.SyncBatchNorm, dweight and dbias cover this worker's batch
    only; their sum over the workers is the whole batch's.
    """
    plan, dtype, xp = pending.plan, pending.dtype, layer.xp
    eps = layer._eps_for(dtype)
    with on_device(layer.device):
        centered = distributed.relative_to(pending.centered, part, total, xp, dtype)
        totals = core.GradSums(
            total.count, centered.moments, *(xp.asarray(a, dtype=dtype) for a in (total.sum_dy, total.sum_dy_xmu))
        )
        weight, _ = layer._params(plan, dtype)
        dx, _, _ = layer._math.grad_input(centered, pending.dyv, plan, weight, eps, dtype, totals, training=True)
        own_dy, own_dy_xmu = distributed.own_sums(part, total)
        dweight = sum_to(own_dy_xmu * core.rstd(total.moments.var, eps), plan.param_shape)
        grads = layer._grads(xp.asarray(dweight), xp.asarray(sum_to(own_dy, plan.param_shape)))
        return dx.reshape(pending.shape).astype(pending.input_dtype, copy=False), grads
