"""Stateful normalization layers with PyTorch's semantics.

``_NormBase`` holds what every kind shares (config, parameters, running
statistics, state dicts, forward/backward around the generic core). A kind
only says how an input shape becomes a :class:`~normkernels.core.Plan`, how
many values stand behind each statistic (for PyTorch's "more than 1 value"
rule) and how its running statistics are updated.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from normkernels import compiled, core, distributed, fused, monitor
from normkernels.backend import (
    PARAM_DTYPES,
    Array,
    Device,
    as_input_array,
    compute_dtype,
    namespace,
    on_device,
    parse_device,
    to_numpy,
)
from normkernels.errors import ConfigError, NonFiniteError, ShapeError, StateDictError, StateTooLarge

__all__ = [
    "KINDS",
    "MAX_BATCHES_TRACKED",
    "MAX_NORMALIZED_DIMS",
    "BatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "RMSNorm",
    "make_layer",
    "state_budget",
]

_FLOAT_KEYS = ("weight", "bias", "running_mean", "running_var")
#: More trailing dimensions than any input of ours has (the wire allows 32).
MAX_NORMALIZED_DIMS = 32
#: num_batches_tracked stays far below int64's end, so counting further can never overflow.
MAX_BATCHES_TRACKED = 2**62
_STATE_BUDGET: contextvars.ContextVar[int | None] = contextvars.ContextVar("state_budget", default=None)


@contextlib.contextmanager
def state_budget(max_bytes: int | None) -> Iterator[None]:
    """Layers built inside refuse (StateTooLarge), before allocating, state over ``max_bytes`` (None: any)."""
    token = _STATE_BUDGET.set(max_bytes)
    try:
        yield
    finally:
        _STATE_BUDGET.reset(token)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _eps(value: Any, name: str = "eps") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < math.inf):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _momentum(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"momentum must be in [0, 1] or None (cumulative average), got {value!r}")
    return float(value)


def _param_dtype(value: Any) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype not in PARAM_DTYPES:
        raise ConfigError(
            f"dtype must be float32 or float64 (the dtype of parameters and running stats), got {value!r}"
        )
    return dtype


class _NormBase:
    """Config, parameters and running statistics shared by every kind."""

    kind: ClassVar[str]
    #: Does training update running statistics through ``num_batches_tracked``?
    _counts_batches: ClassVar[bool] = True

    def __init__(
        self,
        *,
        param_shape: tuple[int, ...],
        eps: float | None,
        momentum: float | None,
        weight: bool,
        bias: bool,
        track_running_stats: bool,
        device: str | Device | None,
        dtype: Any,
        biased_running_var: bool,
    ) -> None:
        self.param_shape = param_shape
        self.eps = eps
        self.momentum = _momentum(momentum)
        self.track_running_stats = bool(track_running_stats)
        self.biased_running_var = bool(biased_running_var)
        self.device = parse_device(device)
        self.dtype = _param_dtype(dtype)
        self.xp = namespace(self.device)
        # The math: the compiled CPU kernels (NumPy with NORMKERNELS_CPU=numpy), the fused CUDA kernels,
        # or generic CuPy code (NORMKERNELS_FUSED=0).
        self._math = compiled.backend() if self.device.kind == "cpu" else fused if fused.enabled() else core
        self._has = {"weight": bool(weight), "bias": bool(weight and bias)}
        self.weight: Array | None = None
        self.bias: Array | None = None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked = 0
        self._plans: dict[tuple[int, ...], core.Plan] = {}  # validated input shapes (a small cache)
        budget = _STATE_BUDGET.get()
        if budget is not None and self.state_nbytes > budget:
            raise StateTooLarge(self.state_nbytes, budget, f"{type(self).__name__} of param shape {param_shape}")
        self.reset_parameters()

    # ----------------------------------------------------------------- kind hooks
    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        raise NotImplementedError

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        """Raise when batch statistics would rest on a single value (PyTorch's rule)."""

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``make_layer(layer.kind, **layer.config)`` rebuilds the layer."""
        raise NotImplementedError

    # -------------------------------------------------------------- state
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, no batches seen (as PyTorch)."""
        self.num_batches_tracked = 0
        if not self.track_running_stats:
            return
        with on_device(self.device):
            self.running_mean = self.xp.zeros(self.param_shape, dtype=self.dtype)
            self.running_var = self.xp.ones(self.param_shape, dtype=self.dtype)

    def reset_parameters(self) -> None:
        """Weight 1, bias 0, and fresh running statistics."""
        with on_device(self.device):
            self.weight = self.xp.ones(self.param_shape, dtype=self.dtype) if self._has["weight"] else None
            self.bias = self.xp.zeros(self.param_shape, dtype=self.dtype) if self._has["bias"] else None
        self.reset_running_stats()

    def copy(self) -> _NormBase:
        """A snapshot of this layer that costs no array copies.

        Layers never write their arrays in place (training, loading and resets
        bind new arrays), so a shallow copy is independent: training the copy
        leaves this layer untouched and vice versa. The service uses it for
        copy-on-write updates while readers keep using the old state.
        """
        return copy.copy(self)

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of one state tensor (weight, bias, running_mean or running_var)."""
        return math.prod(self.param_shape) * self.dtype.itemsize

    @property
    def state_nbytes(self) -> int:
        """Bytes of the float state tensors (known before they exist)."""
        return self.tensor_nbytes * (sum(self._has.values()) + (2 if self.track_running_stats else 0))

    @property
    def state_keys(self) -> tuple[str, ...]:
        """The keys of :meth:`state_dict`, in PyTorch's order."""
        keys = tuple(k for k in ("weight", "bias") if self._has[k])
        if self.track_running_stats:
            keys += ("running_mean", "running_var", "num_batches_tracked")
        return keys

    def state_dict(self) -> dict[str, Array]:
        """Copies of the state under PyTorch's keys, on the layer's device."""
        state = {k: getattr(self, k).copy() for k in self.state_keys if k != "num_batches_tracked"}
        if self.track_running_stats:
            with on_device(self.device):
                state["num_batches_tracked"] = self.xp.asarray(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Load a state dict (NumPy/CuPy arrays or torch tensors), all or nothing.

        Shapes must match exactly; float tensors are cast to the layer's dtype
        (as ``torch.Tensor.copy_`` does); non-finite values, negative running
        variances, unknown keys and (with ``strict``) missing keys are refused
        with a :class:`StateDictError`, and then nothing changes.
        """
        expected = self.state_keys
        unknown = sorted(set(state) - set(expected))
        if unknown:
            raise StateDictError(f"unknown state key(s) {unknown} for {type(self).__name__}; expected {list(expected)}")
        missing = [k for k in expected if k not in state]
        if strict and missing:
            raise StateDictError(f"missing state key(s) {missing}; pass strict=False to load a subset")
        staged = {key: self._validated_state_value(key, state[key]) for key in expected if key in state}
        with on_device(self.device):
            for key, value in staged.items():
                setattr(self, key, value if key == "num_batches_tracked" else self.xp.asarray(value))

    def _validated_state_value(self, key: str, value: Any) -> Any:
        try:
            arr = to_numpy(value.detach().cpu() if hasattr(value, "detach") else value)
        except Exception as exc:  # whatever the foreign array raised, report it as a state error
            raise StateDictError(f"state[{key!r}] is not an array: {exc}") from exc
        if key == "num_batches_tracked":
            if arr.dtype.kind not in "iu" or arr.size != 1 or arr.ndim > 1:
                raise StateDictError(
                    "state['num_batches_tracked'] must be one integer (an int64 scalar), "
                    f"got dtype {arr.dtype} shape {arr.shape}"
                )
            count = int(arr.reshape(()))
            if count < 0:
                raise StateDictError(f"state['num_batches_tracked'] must be >= 0, got {count}")
            if count > MAX_BATCHES_TRACKED:
                raise StateDictError(f"state['num_batches_tracked'] must be at most 2**62 (batches seen), got {count}")
            return count
        if tuple(arr.shape) != self.param_shape:
            raise StateDictError(f"state[{key!r}] has shape {tuple(arr.shape)}, the layer needs {self.param_shape}")
        if arr.dtype.kind != "f":
            raise StateDictError(f"state[{key!r}] has dtype {arr.dtype}; it must be a floating-point array")
        arr = arr.astype(self.dtype)  # always a copy: the caller's array stays theirs
        if not np.isfinite(arr).all():
            raise StateDictError(f"state[{key!r}] contains NaN or Inf")
        if key == "running_var" and (arr < 0).any():
            raise StateDictError("state['running_var'] has negative entries; a variance must be >= 0")
        return arr

    # -------------------------------------------------------------- compute
    def _prepare(self, x: Any, training: bool, dy: Any = None, whole_batch: bool = True) -> tuple[Any, ...]:
        """Validate inputs; returns (x, dy, plan, compute dtype, use batch statistics).

        ``whole_batch=False``: x is one worker's part of a synchronized batch,
        which may hold a single value per channel.
        """
        x = as_input_array(x, self.device, "x")
        if x.size == 0:
            raise ShapeError(f"x has shape {tuple(x.shape)} with no elements; send at least one sample")
        plan = self._plans.get(x.shape)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            plan = self._plans[x.shape] = self._plan(tuple(x.shape))
        dtypes = [x.dtype, self.dtype]
        if dy is not None:
            dy = as_input_array(dy, self.device, "dy")
            if dy.shape != x.shape:
                raise ShapeError(f"dy has shape {tuple(dy.shape)} but x has shape {tuple(x.shape)}; they must match")
            dtypes.append(dy.dtype)
        use_batch_stats = training or not self.track_running_stats
        if use_batch_stats and whole_batch:
            self._check_batch(tuple(x.shape))
        return x, dy, plan, compute_dtype(*dtypes), use_batch_stats

    def _params(self, plan: core.Plan, dtype: np.dtype) -> tuple[Array | None, Array | None]:
        return tuple(
            None if p is None else p.astype(dtype, copy=False).reshape(plan.param_shape)
            for p in (self.weight, self.bias)
        )

    def _running_moments(self, plan: core.Plan) -> core.Moments:
        return core.Moments(self.running_mean.reshape(plan.param_shape), self.running_var.reshape(plan.param_shape))

    def _eps_for(self, dtype: np.dtype) -> float:
        return self.eps

    def forward(self, x: Any, training: bool = True) -> Array:
        """Normalize ``x``; in training, update the running statistics (if tracked)."""
        return self._forward(x, training, report=False)[0]

    def train_with_report(self, x: Any) -> tuple[Array, monitor.BatchReport]:
        """A training forward plus the batch's covariate-shift and entropy numbers (:mod:`normkernels.monitor`)."""
        return self._forward(x, training=True, report=True)

    def _forward(self, x: Any, training: bool, report: bool) -> tuple[Array, monitor.BatchReport | None]:
        x, _, plan, dtype, use_batch_stats = self._prepare(x, training)
        with on_device(self.device):
            xv = x.reshape(plan.view)
            weight, bias = self._params(plan, dtype)
            eps = self._eps_for(dtype)
            if not use_batch_stats:
                y = self._math.forward_eval(xv, plan, self._running_moments(plan), weight, bias, eps, dtype)
                return y.reshape(x.shape).astype(x.dtype, copy=False), None
            y, stats = self._math.forward_train(xv, plan, weight, bias, eps, dtype)
            prior = core.Moments(self.running_mean, self.running_var)  # the update binds new arrays
            batch = self._after_training_batch(stats, plan.count) if training else None
            # The fused kernels write y in x's dtype; the report sums it in the compute dtype.
            summary = (
                monitor.batch_report(plan, stats, y.astype(dtype, copy=False), eps, batch, prior) if report else None
            )
            return y.reshape(x.shape).astype(x.dtype, copy=False), summary

    __call__ = forward

    def backward(self, x: Any, dy: Any, training: bool = True) -> tuple[Array, dict[str, Array | None]]:
        """Gradients of ``sum(forward(x, training) * dy)``: ``(dx, {"weight": ..., "bias": ...})``.

        Training mode differentiates through the batch statistics of ``x``;
        eval mode with running statistics treats them as constants. The state
        never changes.
        """
        x, dy, plan, dtype, use_batch_stats = self._prepare(x, training, dy)
        with on_device(self.device):
            weight, _ = self._params(plan, dtype)
            stats = None if use_batch_stats else self._running_moments(plan)
            dx, dweight, dbias = self._math.backward(
                x.reshape(plan.view), dy.reshape(plan.view), plan, weight, self._eps_for(dtype), dtype, stats
            )
            return dx.reshape(x.shape).astype(x.dtype, copy=False), self._grads(dweight, dbias)

    # -------------------------------------------------------------- synchronized batch statistics
    # One batch split across workers (torch.nn.SyncBatchNorm): each worker
    # reduces its part, :mod:`normkernels.distributed` combines the parts, and
    # each worker finishes its part with the totals. The running statistics
    # are updated once per step, from the totals (:meth:`track_synced`).

    #: Can this kind share batch statistics across workers? (Batch norm only.)
    syncable: ClassVar[bool] = False

    def _synced_prepare(self, x: Any, dy: Any = None) -> tuple[Any, ...]:
        if not self.syncable:
            raise ConfigError(
                f"{type(self).__name__} cannot synchronize statistics across workers: only batch norm "
                "(torch.nn.SyncBatchNorm) shares batch statistics; the other kinds normalize each sample alone"
            )
        return self._prepare(x, True, dy, whole_batch=False)

    def synced_part(self, x: Any) -> core.GradSums:
        """This worker's part of a synchronized training forward: its count and moments (host, float64)."""
        x, _, plan, dtype, _ = self._synced_prepare(x)
        with on_device(self.device):
            moments = self._math.moments(x.reshape(plan.view), plan, dtype)
            self._check_finite(moments)
        return distributed.on_host(core.GradSums(plan.count, moments, None, None))

    def track_synced(self, total: core.GradSums) -> None:
        """Check a synchronized step's combined statistics and fold them into the running statistics."""
        if total.count < 2:
            raise ShapeError(
                f"{type(self).__name__} needs more than 1 value per channel to compute batch statistics; "
                "all workers of the step together sent 1: send larger batches"
            )
        with on_device(self.device):
            moments = core.Moments(*(self.xp.asarray(a) for a in total.moments))
            self._after_training_batch(moments, total.count)

    def forward_synced(self, x: Any, total: core.GradSums) -> Array:
        """Training-mode output for this worker's x, normalized with the combined statistics."""
        x, _, plan, dtype, _ = self._synced_prepare(x)
        with on_device(self.device):
            stats = core.Moments(*(self.xp.asarray(a, dtype=dtype).reshape(plan.stat_shape) for a in total.moments))
            weight, bias = self._params(plan, dtype)
            y = self._math.forward_eval(x.reshape(plan.view), plan, stats, weight, bias, self._eps_for(dtype), dtype)
            return y.reshape(x.shape).astype(x.dtype, copy=False)

    def synced_grad_part(self, x: Any, dy: Any) -> tuple[core.GradSums, SyncedBackward]:
        """This worker's part of a synchronized training backward: its sums (host), and what finishes it."""
        x, dy, plan, dtype, _ = self._synced_prepare(x, dy)
        with on_device(self.device):
            dyv = dy.reshape(plan.view)
            centered, sums = self._math.grad_sums(x.reshape(plan.view), dyv, plan, dtype)
            self._check_finite(sums.moments)
        return distributed.on_host(sums), SyncedBackward(x.shape, x.dtype, plan, dtype, dyv, centered)

    def backward_synced(
        self, pending: SyncedBackward, part: core.GradSums, total: core.GradSums
    ) -> tuple[Array, dict[str, Array | None]]:
        """This worker's dx (through the combined statistics) and its own share of dweight and dbias.

        As in torch.nn.SyncBatchNorm, dweight and dbias cover this worker's
        batch only; their sum over the workers is the whole batch's.
        """
        plan, dtype, xp = pending.plan, pending.dtype, self.xp
        eps = self._eps_for(dtype)
        with on_device(self.device):
            centered = distributed.relative_to(pending.centered, part, total, xp, dtype)
            totals = core.GradSums(
                total.count, centered.moments, *(xp.asarray(a, dtype=dtype) for a in (total.sum_dy, total.sum_dy_xmu))
            )
            weight, _ = self._params(plan, dtype)
            dx, _, _ = self._math.grad_input(centered, pending.dyv, plan, weight, eps, dtype, totals, training=True)
            own_dy, own_dy_xmu = distributed.own_sums(part, total)
            dweight = own_dy_xmu / np.sqrt(total.moments.var + eps)
            grads = self._grads(xp.asarray(dweight), xp.asarray(own_dy))
            return dx.reshape(pending.shape).astype(pending.input_dtype, copy=False), grads

    def _grads(self, dweight: Array, dbias: Array) -> dict[str, Array | None]:
        """Parameter gradients in the parameters' shape and dtype (None for a missing parameter)."""
        return {
            "weight": dweight.reshape(self.param_shape).astype(self.dtype) if self._has["weight"] else None,
            "bias": dbias.reshape(self.param_shape).astype(self.dtype) if self._has["bias"] else None,
        }

    def _check_finite(self, stats: core.Moments, where: str = "its statistics") -> None:
        xp = self.xp
        finite = xp.isfinite(stats.var).all() and (stats.mean is None or xp.isfinite(stats.mean).all())
        if not bool(finite):
            raise NonFiniteError(
                "the training batch contains NaN or Inf (or values so large that "
                f"{where} overflow): it was rejected and the layer's running statistics are unchanged"
            )

    def _after_training_batch(self, stats: core.Moments, n: int) -> core.Moments | None:
        """Refuse a non-finite batch, then update the running statistics (all or nothing).

        ``n`` values stand behind each statistic. Returns the per-channel batch
        statistics folded in (None without running statistics).
        """
        self._check_finite(stats)
        if not self.track_running_stats:
            return None
        # Per-instance statistics (instance norm) are averaged over the batch.
        channels = self.running_mean.shape[0]
        mean = stats.mean.reshape(-1, channels).sum(axis=0)
        var = stats.var.reshape(-1, channels).sum(axis=0)
        rows = stats.var.size // channels
        var_scale = 1.0 / rows if self.biased_running_var else n / ((n - 1) * rows)
        mean, var = mean * (1.0 / rows), var * var_scale
        batches = self.num_batches_tracked + 1 if self._counts_batches else self.num_batches_tracked
        factor = self._update_factor(batches)
        running_mean = ((1.0 - factor) * self.running_mean + factor * mean).astype(self.dtype, copy=False)
        running_var = ((1.0 - factor) * self.running_var + factor * var).astype(self.dtype, copy=False)
        # Finite in the compute dtype may still overflow the state's dtype (float64 x into float32 stats).
        self._check_finite(core.Moments(running_mean, running_var), f"the running statistics in {self.dtype}")
        if batches > MAX_BATCHES_TRACKED:
            raise StateDictError(f"num_batches_tracked is at its limit ({MAX_BATCHES_TRACKED}); reset it with SetState")
        self.running_mean, self.running_var = running_mean, running_var
        self.num_batches_tracked = batches
        return core.Moments(mean, var)

    def _update_factor(self, batches: int) -> float:
        """Exponential-average factor: momentum, or 1/batches for a cumulative average."""
        return 1.0 / batches if self.momentum is None else self.momentum

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True)
class SyncedBackward:
    """A worker's backward between its sums and the combined ones."""

    shape: tuple[int, ...]
    input_dtype: np.dtype
    plan: core.Plan
    dtype: np.dtype
    dyv: Array
    centered: core.Centered


class _ChannelNorm(_NormBase):
    """Kinds over (N, C, *spatial) inputs with per-channel parameters."""

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        self.num_features = _positive_int(num_features, "num_features")
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
            eps=_eps(eps),
            momentum=momentum,
            weight=affine,
            bias=affine,
            track_running_stats=track_running_stats,
            device=device,
            dtype=dtype,
            biased_running_var=biased_running_var,
        )

    @property
    def config(self) -> dict[str, Any]:
        return {
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": self._has["weight"],
            "track_running_stats": self.track_running_stats,
            "device": str(self.device),
            "dtype": self.dtype.name,
            "biased_running_var": self.biased_running_var,
        }


class BatchNorm(_TrackedNorm):
    """Batch normalization over (N, C, *spatial): PyTorch's BatchNorm1d/2d/3d."""

    kind = "batch_norm"
    syncable = True

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
        self.num_groups = _positive_int(num_groups, "num_groups")
        channels = _positive_int(num_channels, "num_channels")
        if channels % self.num_groups:
            raise ConfigError(f"num_groups ({self.num_groups}) must divide num_channels ({channels})")
        super().__init__(
            channels,
            eps=_eps(eps),
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

    @property
    def config(self) -> dict[str, Any]:
        return {
            "num_groups": self.num_groups,
            "num_channels": self.num_features,
            "eps": self.eps,
            "affine": self._has["weight"],
            "device": str(self.device),
            "dtype": self.dtype.name,
        }

    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        n, c, s = self._split(shape)
        g = self.num_groups
        return core.Plan(view=(n, g, c // g, s), stat_shape=(n, g, 1, 1), param_shape=(1, g, c // g, 1))

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        # PyTorch's rule, verbatim: N * C/G * spatial must exceed 1.
        n, c, s = self._split(shape)
        if n * (c // self.num_groups) * s == 1:
            raise self._one_value_error(shape, "value per group")


def _normalized_shape(value: Any) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, numbers.Integral) else value
    try:
        dims = tuple(dims)
    except TypeError:
        raise ConfigError(f"normalized_shape must be an int or a sequence of ints, got {value!r}") from None
    if not dims:
        raise ConfigError("normalized_shape must have at least one dimension")
    if len(dims) > MAX_NORMALIZED_DIMS:
        raise ConfigError(f"normalized_shape may have at most {MAX_NORMALIZED_DIMS} dimensions, got {len(dims)}")
    return tuple(_positive_int(d, "every normalized_shape entry") for d in dims)


class _TrailingNorm(_NormBase):
    """Kinds over (..., *normalized_shape) inputs with elementwise parameters."""

    _center: ClassVar[bool] = True

    def __init__(self, normalized_shape: Any, **kwargs: Any) -> None:
        self.normalized_shape = _normalized_shape(normalized_shape)
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
        self._bias_flag = bool(bias)
        super().__init__(
            normalized_shape,
            eps=_eps(eps),
            weight=elementwise_affine,
            bias=bias,
            device=device,
            dtype=dtype,
            biased_running_var=False,
        )

    @property
    def config(self) -> dict[str, Any]:
        return {
            "normalized_shape": list(self.normalized_shape),
            "eps": self.eps,
            "elementwise_affine": self._has["weight"],
            "bias": self._bias_flag,
            "device": str(self.device),
            "dtype": self.dtype.name,
        }


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
            eps=None if eps is None else _eps(eps),
            weight=elementwise_affine,
            bias=False,
            device=device,
            dtype=dtype,
            biased_running_var=False,
        )

    @property
    def config(self) -> dict[str, Any]:
        return {
            "normalized_shape": list(self.normalized_shape),
            "eps": self.eps,
            "elementwise_affine": self._has["weight"],
            "device": str(self.device),
            "dtype": self.dtype.name,
        }

    def _eps_for(self, dtype: np.dtype) -> float:
        return float(np.finfo(dtype).eps) if self.eps is None else self.eps


#: Layer classes by kind name (the names the service and the wire use).
KINDS: dict[str, type[_NormBase]] = {cls.kind: cls for cls in (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm)}


def make_layer(kind: str, **config: Any) -> _NormBase:
    """Build a layer by kind name: ``make_layer("group_norm", num_groups=4, num_channels=32)``."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ConfigError(f"unknown layer kind {kind!r}; choose one of {sorted(KINDS)}") from None
    try:
        return cls(**config)
    except TypeError as exc:  # unknown or missing constructor arguments
        raise ConfigError(f"bad config for {kind}: {exc}") from None
