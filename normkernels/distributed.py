"""Batch statistics of one batch split across workers: what torch.nn.SyncBatchNorm all-reduces.

Each worker reduces its part of the batch to a few numbers per channel (a
:class:`~normkernels.core.GradSums` holds them: count, mean, variance, and in
backward sum(dy) and sum(dy * (x - mean))), on its own device. The
``combine`` functions merge the parts on the host in float64, in rank order,
so every worker gets bit-identical totals; each worker then finishes its own
part with them.

Means and variances merge by Chan, Golub and LeVeque's pairwise update, so
parts may differ in size and nothing is computed as E[x^2] - E[x]^2. The
backward sums are taken about each part's own mean and moved to the global
one with sum(dy * (x - mu)) = sum(dy * (x - m_i)) + (m_i - mu) * sum(dy).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from normkernels.backend import Array, to_numpy
from normkernels.core import Centered, GradSums, Moments

__all__ = ["add", "combine", "on_host", "own_sums", "relative_to"]


def on_host(part: GradSums) -> GradSums:
    """``part`` as float64 NumPy arrays (what travels between workers); absent sums become zeros."""

    def host(a: Array | None) -> np.ndarray | None:
        return None if a is None else to_numpy(a).astype(np.float64)

    mean, var = host(part.moments.mean), host(part.moments.var)
    zeros = np.zeros_like(var)
    return GradSums(
        part.count,
        Moments(mean, var),
        zeros if part.sum_dy is None else host(part.sum_dy),
        zeros if part.sum_dy_xmu is None else host(part.sum_dy_xmu),
    )


def combine(parts: Sequence[GradSums]) -> GradSums:
    """The whole batch's count, moments and backward sums from its parts' (host, float64)."""
    if not parts:
        raise ValueError("combine needs at least one part")
    if parts[0].moments.mean is None:  # uncentered (RMS norm): var holds mean squares, which simply average
        count = sum(part.count for part in parts)
        square = sum(part.moments.var * (part.count / count) for part in parts)
        return GradSums(count, Moments(None, square), sum(p.sum_dy for p in parts), sum(p.sum_dy_xmu for p in parts))
    count, mean, m2 = 0, np.zeros_like(parts[0].moments.var), np.zeros_like(parts[0].moments.var)
    for part in parts:
        total = count + part.count
        delta = part.moments.mean - mean
        mean = mean + delta * (part.count / total)
        m2 = m2 + part.moments.var * part.count + delta * delta * (count * part.count / total)
        count = total
    sum_dy = sum(part.sum_dy for part in parts)
    sum_dy_xmu = sum(part.sum_dy_xmu + (part.moments.mean - mean) * part.sum_dy for part in parts)
    return GradSums(count, Moments(mean, m2 / count), sum_dy, sum_dy_xmu)


def add(parts: Sequence[GradSums]) -> GradSums:
    """Backward sums already taken about one common mean (statistics mode): added in rank order."""
    if not parts:
        raise ValueError("add needs at least one part")
    return GradSums(
        sum(part.count for part in parts),
        parts[0].moments,
        sum(part.sum_dy for part in parts),
        sum(part.sum_dy_xmu for part in parts),
    )


def relative_to(centered: Centered, part: GradSums, total: GradSums, xp: object, dtype: np.dtype) -> Centered:
    """A part's centered data re-expressed about the whole batch's mean, carrying its moments.

    ``centered.d - centered.offset`` is x minus the part's mean; the result's
    ``d - offset`` is x minus the total's mean (d itself is not touched).
    """
    if part.moments.mean is None:  # uncentered: nothing to move
        return Centered(centered.d, centered.offset, Moments(None, xp.asarray(total.moments.var, dtype=dtype)))
    offset = to_numpy(centered.offset) + (total.moments.mean - part.moments.mean)
    moments = Moments(xp.asarray(total.moments.mean, dtype=dtype), xp.asarray(total.moments.var, dtype=dtype))
    return Centered(centered.d, xp.asarray(offset, dtype=dtype), moments)


def own_sums(part: GradSums, total: GradSums) -> tuple[np.ndarray, np.ndarray]:
    """A part's sum(dy) and sum(dy * (x - mu)) about the whole batch's mean mu (its own dweight, dbias terms)."""
    if part.moments.mean is None:
        return part.sum_dy, part.sum_dy_xmu
    return part.sum_dy, part.sum_dy_xmu + (part.moments.mean - total.moments.mean) * part.sum_dy
