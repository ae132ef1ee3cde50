"""Numbers that say how a training batch looks to its layer (covariate shift and standardized entropy).

*Covariate shift* compares the batch's per-channel statistics, exactly as a
Train folds them into the running statistics, with the running statistics
*before* that Train::

    mean_shift    = mean_c |mu_B,c - mu_run,c| / sqrt(var_run,c + eps)
    log_var_shift = mean_c |log((var_B,c + eps) / (var_run,c + eps))|

``mean_shift`` is in running standard deviations; ``log_var_shift`` is 0 when
the batch has the running variance and log(2) ~ 0.69 when it has twice (or
half) of it. Only layers with running statistics have them.

*Gaussian entropy* is ``0.5 * log(2 pi e (s2 + eps))`` averaged over the
groups the layer normalizes together (a channel for batch norm, an
(instance, channel) for instance norm, an (instance, group) for group norm,
a sample for layer and RMS norm), where ``s2`` is the second moment the layer
normalizes: the biased variance, or the mean square for RMS norm. A
normalized output with weight 1 sits at 0.5 * log(2 pi e) ~ 1.419 nats;
a weight w adds log|w|.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from normkernels import compiled
from normkernels.backend import Array, array_module, dot_to, sum_to
from normkernels.core import Moments, Plan

__all__ = ["HALF_LOG_2PI_E", "BatchReport", "batch_report", "gaussian_entropy", "once", "statistics_report"]

#: Entropy in nats of a unit-variance Gaussian.
HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


class BatchReport(NamedTuple):
    """Monitoring numbers of one training batch (see the module docstring)."""

    input_entropy: float
    output_entropy: float
    mean_shift: float | None  # None for layers without running statistics
    log_var_shift: float | None


def once(compute: Callable[[], BatchReport]) -> Callable[[], BatchReport]:
    """``compute`` run at the first call only (from any thread); later calls answer its report."""
    lock = threading.Lock()
    done: list[BatchReport] = []

    def report() -> BatchReport:
        with lock:
            if not done:
                done.append(compute())
            return done[0]

    return report


def gaussian_entropy(second_moment: Array, eps: float) -> float:
    """Mean over groups of the entropy (nats) of a Gaussian with variance ``second_moment + eps``."""
    xp = array_module(second_moment)
    return HALF_LOG_2PI_E + 0.5 * float(xp.log(second_moment + eps).mean())


def _second_moment(yv: Array, plan: Plan) -> Array:
    """The biased variance (or mean square, uncentered) of ``yv`` per statistics group; one pass."""
    if isinstance(yv, np.ndarray) and compiled.enabled():  # one multi-threaded pass of the CPU kernels
        return compiled.moments(yv, plan, yv.dtype).var
    square = dot_to(yv, yv, plan.stat_shape) / plan.count
    if not plan.center:
        return square
    mean = sum_to(yv, plan.stat_shape) / plan.count
    return array_module(yv).maximum(square - mean * mean, 0)  # y is normalized: no cancellation to fear


def _shifts(eps: float, batch: Moments | None, running: Moments | None) -> tuple[float | None, float | None]:
    if batch is None or running is None:
        return None, None
    xp = array_module(batch.var)
    run_var = running.var + eps
    mean_shift = float((xp.abs(batch.mean - running.mean) / xp.sqrt(run_var)).mean())
    return mean_shift, float(xp.abs(xp.log((batch.var + eps) / run_var)).mean())


def statistics_report(
    groups: Moments, weight: Array | float, eps: float, batch: Moments | None, running: Moments | None
) -> BatchReport:
    """The report of a batch known only by its per-group moments (statistics mode).

    Normalized, a group of variance v has variance w^2 v / (v + eps) whatever its mean and bias: the
    output's entropy follows without the output. ``groups`` as (groups, channels), ``weight`` per channel.
    """
    output = weight * weight * groups.var / (groups.var + eps)
    return BatchReport(gaussian_entropy(groups.var, eps), gaussian_entropy(output, eps), *_shifts(eps, batch, running))


def batch_report(
    plan: Plan,
    x_moments: Moments,
    yv: Array,
    eps: float,
    batch: Moments | None = None,
    running: Moments | None = None,
) -> BatchReport:
    """The report of a batch with moments ``x_moments`` that gave output ``yv`` (in ``plan.view``).

    ``batch`` (the per-channel statistics folded into the running ones) and
    ``running`` (the running statistics before the batch) give the shift.
    """
    return BatchReport(
        gaussian_entropy(x_moments.var, eps),
        gaussian_entropy(_second_moment(yv, plan), eps),
        *_shifts(eps, batch, running),
    )
