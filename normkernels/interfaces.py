"""The typed surfaces other code relies on: a layer, a synchronizable layer, and a math backend.

Every kind in :data:`normkernels.KINDS` is a :class:`NormLayer`; batch norm is
also a :class:`SyncedNorm`. The math backends (:mod:`normkernels.core` on
NumPy and CuPy, :mod:`normkernels.fused` on CUDA) are modules that satisfy
:class:`MathBackend`: the layers call nothing else of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from normkernels.backend import Array, Device
from normkernels.core import Centered, GradSums, Moments, Plan
from normkernels.monitor import BatchReport

if TYPE_CHECKING:
    from normkernels.statistics import PendingBackward

__all__ = ["MathBackend", "NormLayer", "SyncedNorm"]


class NormLayer(Protocol):
    """A normalization layer: config, state and PyTorch-exact forward and backward."""

    kind: ClassVar[str]
    device: Device
    dtype: np.dtype
    param_shape: tuple[int, ...]
    track_running_stats: bool
    num_batches_tracked: int

    @property
    def config(self) -> dict[str, Any]: ...
    @property
    def state_keys(self) -> tuple[str, ...]: ...
    @property
    def state_nbytes(self) -> int: ...
    @property
    def tensor_nbytes(self) -> int: ...

    def forward(self, x: Any, training: bool = True) -> Array: ...
    def train_with_report(self, x: Any) -> tuple[Array, BatchReport]: ...
    def backward(self, x: Any, dy: Any, training: bool = True) -> tuple[Array, dict[str, Array | None]]: ...
    def state_dict(self) -> dict[str, Array]: ...
    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None: ...
    def copy(self) -> NormLayer: ...
    def reset_parameters(self) -> None: ...
    def check_statistics(self, part: GradSums, synchronized: bool = False) -> GradSums: ...
    def track_statistics(self, total: GradSums, synchronized: bool = False) -> BatchReport: ...
    def fold_statistics(self, total: GradSums, synchronized: bool = False) -> Callable[[], BatchReport]: ...


class SyncedNorm(NormLayer, Protocol):
    """A layer whose batch statistics several workers share (torch.nn.SyncBatchNorm): batch norm."""

    def synced_part(self, x: Any) -> GradSums: ...
    def track_synced(self, total: GradSums) -> BatchReport: ...
    def forward_synced(self, x: Any, total: GradSums) -> Array: ...
    def synced_grad_part(self, x: Any, dy: Any) -> tuple[GradSums, PendingBackward]: ...
    def backward_synced(
        self, pending: PendingBackward, part: GradSums, total: GradSums
    ) -> tuple[Array, dict[str, Array | None]]: ...


class MathBackend(Protocol):
    """The kernels a layer runs, on views shaped by a :class:`~normkernels.core.Plan`: the generic array code
    (:mod:`normkernels.core`), the compiled CPU kernels (:mod:`normkernels.compiled`) and the fused CUDA
    kernels (:mod:`normkernels.fused`)."""

    def forward_train(
        self, xv: Array, plan: Plan, weight: Array | None, bias: Array | None, eps: float, dtype: np.dtype
    ) -> tuple[Array, Moments]: ...

    def forward_eval(
        self,
        xv: Array,
        plan: Plan,
        stats: Moments,
        weight: Array | None,
        bias: Array | None,
        eps: float,
        dtype: np.dtype,
    ) -> Array: ...

    def backward(
        self,
        xv: Array,
        dyv: Array,
        plan: Plan,
        weight: Array | None,
        eps: float,
        dtype: np.dtype,
        stats: Moments | None = None,
    ) -> tuple[Array, Array, Array]: ...

    # The pieces of a step whose statistics are combined elsewhere (normkernels.statistics).
    def moments(self, xv: Array, plan: Plan, dtype: np.dtype) -> Moments: ...

    def grad_sums(
        self, xv: Array, dyv: Array, plan: Plan, dtype: np.dtype, stats: Moments | None = None
    ) -> tuple[Centered, GradSums]: ...

    def grad_input(
        self,
        centered: Centered,
        dyv: Array,
        plan: Plan,
        weight: Array | None,
        eps: float,
        dtype: np.dtype,
        sums: GradSums,
        training: bool,
        out: Array | None = None,
    ) -> tuple[Array, Array, Array]: ...
