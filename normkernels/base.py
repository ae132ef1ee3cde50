"""What every kind shares: config, parameters, running statistics, state dicts, forward and backward.

A kind (:mod:`normkernels.layers`) only says how an input shape becomes a
:class:`~normkernels.core.Plan`, how many values stand behind each statistic
(for PyTorch's "more than 1 value" rule) and how its running statistics are
updated. Its config is its constructor's signature: :attr:`_NormBase.config`
reads the values back under the same names.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, NamedTuple

import numpy as np

from normkernels import arguments, compiled, core, distributed, fused, monitor
from normkernels.backend import (
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
from normkernels.interfaces import MathBackend

__all__ = ["MAX_BATCHES_TRACKED", "Prepared", "config_names", "config_parameters", "state_budget"]

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


@functools.cache
def config_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """A kind's config: its constructor's arguments, in order, with their defaults and annotations."""
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}


def config_names(cls: type) -> tuple[str, ...]:
    """The names of a kind's config (its constructor's arguments), in order."""
    return tuple(config_parameters(cls))


def _as_input(y: Array, x: Array) -> Array:
    """``y`` in ``x``'s shape and dtype (no astype call when it is in that dtype already: a small input's
    whole call costs a few microseconds)."""
    y = y.reshape(x.shape)
    return y if y.dtype == x.dtype else y.astype(x.dtype)


class Prepared(NamedTuple):
    """A validated call: the input (and dy) on the layer's device, its plan and how to compute."""

    x: Array
    dy: Array | None
    plan: core.Plan
    dtype: np.dtype  # the compute dtype
    use_batch_stats: bool


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
        self.momentum = arguments.momentum(momentum)
        self.track_running_stats = bool(track_running_stats)
        self.biased_running_var = bool(biased_running_var)
        self.device = parse_device(device)
        self.dtype = arguments.param_dtype(dtype)
        self.xp = namespace(self.device)
        # The math: the compiled CPU kernels (NumPy with NORMKERNELS_CPU=numpy), the fused CUDA kernels,
        # or generic CuPy code (NORMKERNELS_FUSED=0).
        self._math: MathBackend = (
            compiled.backend() if self.device.kind == "cpu" else fused if fused.enabled() else core
        )
        self._has = {"weight": bool(weight), "bias": bool(weight and bias)}
        self._bias_given = bool(bias)
        self.weight: Array | None = None
        self.bias: Array | None = None
        self.running_mean: Array | None = None
        self.running_var: Array | None = None
        self.num_batches_tracked = 0
        self._plans: dict[tuple[int, ...], core.Plan] = {}  # validated input shapes (a small cache)
        # The arrays _params last converted, and what it made of them.
        self._param_views: tuple[Any, Any, Any, tuple[Array | None, Array | None]] = (None, None, None, (None, None))
        budget = _STATE_BUDGET.get()
        if budget is not None and self.state_nbytes > budget:
            raise StateTooLarge(self.state_nbytes, budget, f"{type(self).__name__} of param shape {param_shape}")
        self.reset_parameters()

    # ----------------------------------------------------------------- kind hooks
    def _plan(self, shape: tuple[int, ...]) -> core.Plan:
        raise NotImplementedError

    def _check_batch(self, shape: tuple[int, ...]) -> None:
        """Raise when batch statistics would rest on a single value (PyTorch's rule)."""

    #: How a config value is read back where it is not the attribute of the argument's name as given.
    _config_views: ClassVar[dict[str, Callable[[Any], Any]]] = {
        "affine": lambda layer: layer._has["weight"],
        "elementwise_affine": lambda layer: layer._has["weight"],
        "bias": lambda layer: layer._bias_given,  # the flag asked for, not the parameter array of that name
        "normalized_shape": lambda layer: list(layer.normalized_shape),
        "device": lambda layer: str(layer.device),
        "dtype": lambda layer: layer.dtype.name,
    }

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments: ``make_layer(layer.kind, **layer.config)`` rebuilds the layer."""
        views = self._config_views
        return {name: views[name](self) if name in views else getattr(self, name) for name in config_names(type(self))}

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
    def _prepare(self, x: Any, training: bool, dy: Any = None, whole_batch: bool = True) -> Prepared:
        """Validate the inputs of a call.

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
        return Prepared(x, dy, plan, compute_dtype(*dtypes), use_batch_stats)

    def _params(self, plan: core.Plan, dtype: np.dtype) -> tuple[Array | None, Array | None]:
        """Weight and bias in the compute dtype and the plan's parameter shape.

        Kept for the next call while the layer holds the same arrays: layers bind new arrays rather
        than write theirs (see :meth:`copy`), and a small input's call is bound by such steps.
        """
        cached = self._param_views
        if cached[0] is self.weight and cached[1] is self.bias and cached[2] == (plan.param_shape, dtype):
            return cached[3]
        views = tuple(
            None if p is None else p.astype(dtype, copy=False).reshape(plan.param_shape)
            for p in (self.weight, self.bias)
        )
        self._param_views = (self.weight, self.bias, (plan.param_shape, dtype), views)
        return views

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
                return _as_input(y, x), None
            y, stats = self._math.forward_train(xv, plan, weight, bias, eps, dtype)
            prior = core.Moments(self.running_mean, self.running_var)  # the update binds new arrays
            batch = self._after_training_batch(stats, plan.count) if training else None
            # The fused kernels write y in x's dtype; the report sums it in the compute dtype.
            summary = (
                monitor.batch_report(plan, stats, y.astype(dtype, copy=False), eps, batch, prior) if report else None
            )
            return _as_input(y, x), summary

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

    def check_statistics(self, part: core.GradSums, synchronized: bool = False) -> core.GradSums:
        """A batch's statistics (statistics mode) checked against this layer before anything changes, and
        laid out as the layer's own (float64, host; backward sums zero).

        ``part``: the count behind each statistic and each group's mean and
        biased variance, groups in the order of this kind's statistics (a
        channel's for batch norm, a sample's channel's for instance norm).
        Alone, they are only useful to a layer with running statistics;
        ``synchronized`` parts are combined first, which any batch norm needs.
        """
        if not (self.track_running_stats or synchronized):
            raise ConfigError(
                f"{type(self).__name__} keeps no running statistics (track_running_stats=False): a batch's "
                "statistics change nothing on it, so statistics mode needs no call for it"
            )
        mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in part.moments)
        channels = self.param_shape[0]
        shape = self._plan((max(1, mean.size // channels), channels, 1)).stat_shape
        if mean.shape != var.shape or mean.size != math.prod(shape):
            raise ShapeError(
                f"{type(self).__name__} with {channels} channels takes one mean and one m2 per "
                f"{'channel' if math.prod(shape) == channels else 'sample and channel'}, got {mean.size} means "
                f"and {var.size} m2"
            )
        if not (np.isfinite(mean).all() and np.isfinite(var).all()) or (var < 0).any():
            raise NonFiniteError("the statistics contain NaN, Inf or a negative m2: nothing was changed")
        return distributed.on_host(
            core.GradSums(part.count, core.Moments(mean.reshape(shape), var.reshape(shape)), None, None)
        )

    def track_statistics(self, total: core.GradSums, synchronized: bool = False) -> monitor.BatchReport:
        """Fold a training batch given as its statistics into the running statistics (if the layer keeps
        them), as its forward would; returns the batch's monitoring report, computed from the statistics
        (see :meth:`check_statistics`). ``synchronized``: ``total`` combines the ranks of a step."""
        return self.fold_statistics(total, synchronized)()

    def fold_statistics(self, total: core.GradSums, synchronized: bool = False) -> Callable[[], monitor.BatchReport]:
        """:meth:`track_statistics` with the report left to compute when it is read: the service makes one
        per update of every layer and reads one when asked (GetLayer, a metrics scrape). The arrays it
        reads are never written again (layers bind new arrays), so a late report is the same report."""
        mean, var = self.check_statistics(total, synchronized).moments
        sent_by = "all workers of the step together" if synchronized else "the batch"
        if total.count < 2:
            raise ShapeError(
                f"{type(self).__name__} needs more than 1 value per channel to compute batch statistics; "
                f"{sent_by} sent 1: send larger batches"
            )
        prior = core.Moments(self.running_mean, self.running_var)
        with on_device(self.device):
            moments = core.CheckedMoments(self.xp.asarray(mean), self.xp.asarray(var))  # checked above
            batch = self._after_training_batch(moments, total.count)
        weight, eps, device, xp = self.weight, self._eps_for(np.dtype(np.float64)), self.device, self.xp
        groups = core.Moments(*(a.reshape(-1, self.param_shape[0]) for a in moments))

        def report() -> monitor.BatchReport:
            with on_device(device):
                scale = 1.0 if weight is None else xp.asarray(weight, dtype=np.float64)
                return monitor.statistics_report(groups, scale, eps, batch, prior)

        return monitor.once(report)

    def _grads(self, dweight: Array, dbias: Array) -> dict[str, Array | None]:
        """Parameter gradients in the parameters' shape and dtype (None for a missing parameter)."""
        return {
            "weight": dweight.reshape(self.param_shape).astype(self.dtype) if self._has["weight"] else None,
            "bias": dbias.reshape(self.param_shape).astype(self.dtype) if self._has["bias"] else None,
        }

    def _check_finite(self, stats: core.Moments, where: str | Callable[[], str] = "its statistics") -> None:
        """Refuse non-finite ``stats``; ``where`` names them in the error (a callable: made only then)."""
        if getattr(stats, "checked_finite", False):  # the kernel that computed them checked them
            return
        xp = self.xp
        finite = xp.isfinite(stats.var).all() and (stats.mean is None or xp.isfinite(stats.mean).all())
        if not bool(finite):
            raise self._non_finite(where() if callable(where) else where)

    @staticmethod
    def _non_finite(where: str) -> NonFiniteError:
        return NonFiniteError(
            "the training batch contains NaN or Inf (or values so large that "
            f"{where} overflow): it was rejected and the layer's running statistics are unchanged"
        )

    def _after_training_batch(self, stats: core.Moments, n: int) -> core.Moments | None:
        """Refuse a non-finite batch, then update the running statistics (all or nothing).

        ``n`` values stand behind each statistic. Returns the per-channel batch
        statistics folded in (None without running statistics).
        """
        if not self.track_running_stats:
            self._check_finite(stats)
            return None
        # Per-instance statistics (instance norm) are averaged over the batch.
        channels = self.running_mean.shape[0]
        rows = stats.var.size // channels
        var_scale = 1.0 / rows if self.biased_running_var else n / ((n - 1) * rows) if n > 1 else math.inf
        batches = self.num_batches_tracked + 1 if self._counts_batches else self.num_batches_tracked
        factor = self._update_factor(batches)
        # The compiled CPU path folds the checks and the update into one call (None where it cannot).
        fold = getattr(self._math, "track_running", None)
        folded = None if fold is None else fold(stats, self.running_mean, self.running_var, rows, var_scale, factor)
        if folded is not None:
            status, running_mean, running_var, mean, var = folded
            if status:
                raise self._non_finite("its statistics" if status == 1 else self._running_statistics())
        else:
            self._check_finite(stats)
            mean = stats.mean.reshape(-1, channels).sum(axis=0)
            var = stats.var.reshape(-1, channels).sum(axis=0)
            mean, var = mean * (1.0 / rows), var * var_scale
            running_mean = ((1.0 - factor) * self.running_mean + factor * mean).astype(self.dtype, copy=False)
            running_var = ((1.0 - factor) * self.running_var + factor * var).astype(self.dtype, copy=False)
            # Finite in the compute dtype may still overflow the state's dtype (float64 x into float32 stats).
            self._check_finite(core.Moments(running_mean, running_var), self._running_statistics)
        if batches > MAX_BATCHES_TRACKED:
            raise StateDictError(f"num_batches_tracked is at its limit ({MAX_BATCHES_TRACKED}); reset it with SetState")
        self.running_mean, self.running_var = running_mean, running_var
        self.num_batches_tracked = batches
        return core.Moments(mean, var)

    def _running_statistics(self) -> str:
        """What errors call the running statistics (made when needed: formatting a dtype costs a fold 10%)."""
        return f"the running statistics in {self.dtype}"

    def _update_factor(self, batches: int) -> float:
        """Exponential-average factor: momentum, or 1/batches for a cumulative average."""
        return 1.0 / batches if self.momentum is None else self.momentum

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"
