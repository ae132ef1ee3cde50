"""The kinds, each a few lines over :class:`~normkernels.base._NormBase`.

A kind's config is its constructor's signature (the service and the clients
read it from there: :func:`config_names`); a kind says how an input shape
becomes a :class:`~normkernels.core.Plan` and when batch statistics would
rest on a single value. Batch norm alone shares statistics across workers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from normkernels import arguments, core, statistics
from normkernels.backend import Array, Device
from normkernels.base import _NormBase, config_names, config_parameters
from normkernels.errors import ConfigError, ShapeError
from normkernels.interfaces import NormLayer, SyncedNorm
from normkernels.monitor import BatchReport

__all__ = [
    "KINDS",
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNorm2d",
    "RMSNorm",
    "config_names",
    "config_parameters",
    "make_layer",
    "synced",
]


class _ChannelNorm(_NormBase):
    """Kinds over (N, C, *spatial) inputs with per-channel parameters."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        self.num_features = arguments.positive_int(num_features, "num_features")
        super().__init__(param_shape=(self.num_features,), **kwargs)

    def _split(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(N, C, spatial size) of a valid input shape."""
        name = type(self).__name__
        if len(shape) < 2:
            raise ShapeError(
                f"{name} expects input of shape (N, C, *spatial) with rank >= 2, got shape {shape}; "
                "add a batch dimension (x[None]) for a single sample"
            )
        if shape[1] != self.num_features:
            raise ShapeError(
                f"{name} has {self.num_features} channels but x has {shape[1]} in dimension 1 "
                f"(shape {shape}); channels come first after the batch dimension"
            )
        return shape[0], shape[1], math.prod(shape[2:])

    def _one_value_error(self, shape: tuple[int, ...], what: str) -> ShapeError:
        return ShapeError(
            f"{type(self).__name__} needs more than 1 {what} to compute batch statistics, got input shape {shape}; "
            "send a larger batch (or use eval mode with running statistics)"
        )


class _TrackedNorm(_ChannelNorm):
    """Batch and instance norm: per-channel parameters and optional running statistics."""

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float | None,
        affine: bool,
        track_running_stats: bool,
        device: str | Device | None,
        dtype: Any,
        biased_running_var: bool,
    ) -> None:
        super().__init__(
            num_features,
            eps=arguments.eps(eps),
            momentum=momentum,
            weight=affine,
            bias=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            biased_running_var=biased_running_var,
        )


class BatchNorm(_TrackedNorm):
    """Batch normalization over (N, C, *spatial): PyTorch's BatchNorm1d/2d/3d."""

    kind = "batch_norm"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: str | Device | None = "cpu",
        dtype: Any = np.float32,
        biased_running_var: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, biased_running_var)

    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        n, c, s = self._split(shape)
        return core.Plan(view=(n, c, s), stat_shape=(1, c, 1), param_shape=(1, c, 1))

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        n, _, s = self._split(shape)
        if n * s == 1:
            raise self._one_value_error(shape, "value per channel")

    # One batch split across workers (torch.nn.SyncBatchNorm): each worker
    # reduces its part, :mod:`normkernels.distributed` combines the parts, and
    # each worker finishes its part with the totals (:mod:`normkernels.statistics`).
    # The running statistics are updated once per step, from the totals.

    def synced_part(self, x: Any) -> core.GradSums:
        """This worker's part of a synchronized training forward: its count and moments (host, float64)."""
        return statistics.batch_statistics(self, x)

    def track_synced(self, total: core.GradSums) -> BatchReport:
        """Check a synchronized step's combined statistics and fold them into the running statistics."""
        return self.track_statistics(total, synchronized=True)

    def forward_synced(self, x: Any, total: core.GradSums) -> Array:
        """Training-mode output for this worker's x, normalized with the combined statistics."""
        return statistics.normalize(self, x, total)

    def synced_grad_part(self, x: Any, dy: Any) -> tuple[core.GradSums, statistics.PendingBackward]:
        """This worker's part of a synchronized training backward: its sums (host), and what finishes it."""
        return statistics.gradient_sums(self, x, dy)

    def backward_synced(
        self, pending: statistics.PendingBackward, part: core.GradSums, total: core.GradSums
    ) -> tuple[Array, dict[str, Array | None]]:
        """This worker's dx (through the combined statistics) and its own share of dweight and dbias."""
        return statistics.finish_backward(self, pending, part, total)


class InstanceNorm(_TrackedNorm):
    """Instance normalization over (N, C, *spatial): PyTorch's InstanceNorm1d/2d/3d.

    As in PyTorch, running statistics (``track_running_stats=True``) average
    the per-instance statistics over the batch, ``momentum=None`` means a
    factor of 0 (the running statistics stay put), and ``num_batches_tracked``
    is kept in the state dict but never incremented.
    """

    kind = "instance_norm"
    _counts_batches = False

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: str | Device | None = "cpu",
        dtype: Any = np.float32,
        biased_running_var: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, biased_running_var)

    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        n, c, s = self._split(shape)
        return core.Plan(view=(n, c, s), stat_shape=(n, c, 1), param_shape=(1, c, 1))

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        if self._split(shape)[2] == 1:
            raise self._one_value_error(shape, "spatial element")

    def _update_factor(self, batches: int) -> float:
        return 0.0 if self.momentum is None else self.momentum


class GroupNorm(_ChannelNorm):
    """Group normalization: PyTorch's GroupNorm(num_groups, num_channels)."""

    kind = "group_norm"

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: str | Device | None = "cpu",
        dtype: Any = np.float32,
    ) -> None:
        self.num_groups = arguments.positive_int(num_groups, "num_groups")
        channels = arguments.positive_int(num_channels, "num_channels")
        if channels % self.num_groups:
            raise ConfigError(f"num_groups ({self.num_groups}) must divide num_channels ({channels})")
        super().__init__(
            channels,
            eps=arguments.eps(eps),
            momentum=None,
            weight=affine,
            bias=affine,
            track_running_stats=False,
            device=device,
            dtype=dtype,
            biased_running_var=False,
        )

    @property
    def num_channels(self) -> int:
        return self.num_features

    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        n, c, s = self._split(shape)
        g = self.num_groups
        return core.Plan(view=(n, g, c // g, s), stat_shape=(n, g, 1, 1), param_shape=(1, g, c // g, 1))

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        # PyTorch's rule, verbatim: N * C/G * spatial must exceed 1.
        n, c, s = self._split(shape)
        if n * (c // self.num_groups) * s == 1:
            raise self._one_value_error(shape, "value per group")


class LayerNorm2d(_ChannelNorm):
    """Layer normalization over the channels of (N, C, *spatial) at each position: ConvNeXt's LayerNorm2d.

    The numbers of ``torch.nn.LayerNorm(C)`` applied to the channels-last
    permutation of x (as ``timm.layers.LayerNorm2d`` computes them), without
    permuting: statistics over C for every sample and position, per-channel
    weight and bias. The default eps is timm's.
    """

    kind = "layer_norm_2d"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: str | Device | None = "cpu",
        dtype: Any = np.float32,
    ) -> None:
        super().__init__(
            num_features,
            eps=arguments.eps(eps),
            momentum=None,
            weight=elementwise_affine,
            bias=bias,
            track_running_stats=False,
            device=device,
            dtype=dtype,
            biased_running_var=False,
        )

    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        n, c, s = self._split(shape)
        return core.Plan(view=(n, c, s), stat_shape=(n, 1, s), param_shape=(1, c, 1))


class _TrailingNorm(_NormBase):
    """Kinds over (..., *normalized_shape) inputs with elementwise parameters."""

    _center: ClassVar[bool] = True

    def __init__(self, normalized_shape: Any, **kwargs: Any) -> None:
        self.normalized_shape = arguments.normalized_shape(normalized_shape)
        super().__init__(param_shape=self.normalized_shape, momentum=None, track_running_stats=False, **kwargs)

    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        k = len(self.normalized_shape)
        if shape[len(shape) - k :] != self.normalized_shape:
            raise ShapeError(
                f"{type(self).__name__} normalizes trailing dimensions {self.normalized_shape}, "
                f"but x has shape {shape}; its last {k} dimension(s) must equal normalized_shape"
            )
        d = math.prod(self.normalized_shape)
        return core.Plan(
            view=(math.prod(shape) // d, d),
            stat_shape=(math.prod(shape) // d, 1),
            param_shape=(1, d),
            center=self._center,
        )


class LayerNorm(_TrailingNorm):
    """Layer normalization over the trailing ``normalized_shape``: PyTorch's LayerNorm."""

    kind = "layer_norm"

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: str | Device | None = "cpu",
        dtype: Any = np.float32,
    ) -> None:
        super().__init__(
            normalized_shape,
            eps=arguments.eps(eps),
            weight=elementwise_affine,
            bias=bias,
            device=device,
            dtype=dtype,
            biased_running_var=False,
        )


class RMSNorm(_TrailingNorm):
    """Root-mean-square normalization over the trailing ``normalized_shape``: PyTorch's RMSNorm.

    ``eps=None`` uses the machine epsilon of the dtype the math runs in
    (float32 for float16/float32 inputs, float64 for float64), which is what
    PyTorch does; its documentation says "the input dtype's eps", but for a
    float16 input it applies float32's.
    """

    kind = "rms_norm"
    _center = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: str | Device | None = "cpu",
        dtype: Any = np.float32,
    ) -> None:
        super().__init__(
            normalized_shape,
            eps=None if eps is None else arguments.eps(eps),
            weight=elementwise_affine,
            bias=False,
            device=device,
            dtype=dtype,
            biased_running_var=False,
        )

    def _eps_for(self, dtype: np.dtype) -> float:
        return float(np.finfo(dtype).eps) if self.eps is None else self.eps


#: Layer classes by kind name (the names the service and the wire use).
KINDS: dict[str, type[_NormBase]] = {
    cls.kind: cls for cls in (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm, LayerNorm2d)
}


def make_layer(kind: str, **config: Any) -> NormLayer:
    """Build a layer by kind name: ``make_layer("group_norm", num_groups=4, num_channels=32)``."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown layer kind {kind!r}; choose one of {sorted(KINDS)}") from None
    try:
        return cls(**config)
    except TypeError as exc:  # unknown or missing constructor arguments
        raise ConfigError(f"bad config for {kind}: {exc}") from None


def synced(layer: NormLayer) -> SyncedNorm:
    """``layer`` as a layer that shares batch statistics across workers; ConfigError for the kinds that cannot."""
    if not isinstance(layer, BatchNorm):
        raise ConfigError(
            f"{type(layer).__name__} cannot synchronize statistics across workers: only batch norm "
            "(torch.nn.SyncBatchNorm) shares batch statistics; the other kinds normalize each sample alone"
        )
    return layer
