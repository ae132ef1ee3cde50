"""PyTorch modules whose normalization runs on a normserve server.

>>> from normserve.client import NormClient
>>> from normserve.client.torch import RemoteBatchNorm2d, convert_to_remote
>>> nc = NormClient("localhost:50051")                                   # doctest: +SKIP
>>> bn = RemoteBatchNorm2d(64, client=nc, name="encoder.bn1")            # doctest: +SKIP
>>> model = convert_to_remote(torchvision_model, nc, prefix="resnet18.")  # doctest: +SKIP

Each module takes its torch twin's constructor arguments plus ``client`` (a
:class:`~normserve.client.NormClient`) and ``name`` (the server's layer,
created if missing). In training mode a forward is a Train call, in eval
mode an Infer call, and backward is a Gradient call (through an
``autograd.Function``: dx goes to autograd, dweight and dbias to the
module's parameters' ``.grad``).

Who owns what. ``weight`` and ``bias`` are ordinary ``nn.Parameter``\\ s:
any optimizer steps them here. The server owns the running statistics; the
module's buffers mirror them (each Train answers with the new values), so
``state_dict()`` costs no call and matches torch's keys.

How parameter updates reach the server, cheaply. The module remembers the
values it last sent. A training forward whose parameters changed since (an
optimizer step) sends them inside its Train request: the server applies them
before the batch and stores them with the batch's update, so a training step
costs exactly one Train and one Gradient, as with no parameter update. The
Gradient names the Train's kept forward (``keep_forward``), so x is not sent
twice. An eval forward after a change sends them once with a SetState first
(then never again until they change). ``load_state_dict`` writes the whole
state to the server at once.

SyncBatchNorm. Give a :class:`~normserve.client.SyncGroup` (``sync_group=``)
to the batch norm modules of each data-parallel worker, or under
torch.distributed a process group (``process_group=``: ``"world"`` or a group;
:func:`sync_group_of` makes one id for all its ranks, new for every run):
their training forwards and backwards become steps of that group, numbered by
the module's own count of training forwards (:attr:`RemoteNorm.sync_step`), so
every rank must run the same number of them, as with DistributedDataParallel
(:func:`realign_sync_steps` realigns ranks that did not).

Copies and compiling. A copy of a module (``copy.deepcopy``, pickle,
``torch.save``) is its torch twin with the module's current state: it computes
locally and never changes the server's layer (EMA and SWA copies, teachers,
snapshots); convert it again to put it on a server. Under ``torch.compile``
each module's forward is a graph break (it calls the server).

Two modes. ``mode="tensors"`` (the default) is the above: x and dy travel,
the server computes. ``mode="statistics"`` keeps the tensors with the
trainer, as torch.nn.SyncBatchNorm does: forward and backward run in torch
on the tensor's own device (CPU or CUDA), and only per-channel statistics
travel. A training forward of a layer with running statistics updates them
here, as torch does, and queues the batch's statistics (and changed
parameters) for the server without waiting: they travel behind the step on
the client's statistics stream (:mod:`normserve.client.statistics_pipeline`),
and a state read or eval forward first waits for them to be stored. Under
``sync_group`` the forward is one TrainStatistics call (it needs the step's
statistics) and the backward adds one GradientStatistics call; eval forwards
use the running statistics locally, with no call. Kinds without
running statistics (layer, group and RMS norm, untracked instance norm) make
no call per step: their parameters reach the server on ``state_dict()`` or
:meth:`RemoteNorm.sync_state`. Use statistics mode to train (the step costs
local torch plus encoding its updates); tensors mode to have the server
compute (a trainer without torch kernels for its device, or to offload).
"""

from __future__ import annotations

import contextlib
import functools
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import torch
from torch import nn

from normserve.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NormServeError,
    ResourceExhausted,
)
from normserve.client.protocol import SyncGroup
from normserve.client.statistics_pipeline import StatisticsPipeline, UpdateLog, running_after

__all__ = [
    "EXISTING",
    "MODES",
    "ExistingLayerError",
    "RemoteBatchNorm1d",
    "RemoteBatchNorm2d",
    "RemoteBatchNorm3d",
    "RemoteGroupNorm",
    "RemoteInstanceNorm1d",
    "RemoteInstanceNorm2d",
    "RemoteInstanceNorm3d",
    "RemoteLayerNorm",
    "RemoteNorm",
    "RemoteRMSNorm",
    "convert_to_local",
    "convert_to_remote",
    "realign_sync_steps",
    "settle_updates",
    "sync_group_of",
]

_PARAMETERS = ("weight", "bias")
_RUNNING_KEYS = ("running_mean", "running_var")
#: How a module uses its server (see the module docstring).
MODES = ("tensors", "statistics")
#: What converting a module does with a server layer that already has a history (see RemoteNorm.from_torch).
EXISTING = ("refuse", "adopt", "overwrite")


class ExistingLayerError(AlreadyExists, RuntimeError):
    """Converting a module would replace a server layer's different, trained state (see ``existing=``)."""


@dataclass
class _Forward:
    """What a backward needs of its forward."""

    training: bool
    forward_id: str | None
    sync: SyncGroup | None


class RemoteNorm(nn.Module):
    """A torch normalization layer computed by a normserve server (see the module docstring).

    Subclasses name their torch twin; the twin's constructor validates the
    arguments and gives the config, the initial parameters and the buffers.
    """

    torch_class: ClassVar[type[nn.Module]]
    kind: ClassVar[str]
    #: The server's layers of this kind always pair a weight with a bias (not so for layer and RMS norm).
    _affine_has_bias: ClassVar[bool] = True

    def __init__(
        self,
        *args: Any,
        client: Any,
        name: str,
        sync_group: SyncGroup | None = None,
        process_group: Any = None,
        remote_device: str | None = None,
        mode: str = "tensors",
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {mode!r}")
        if process_group is not None:
            if sync_group is not None:
                raise InvalidArgument("give sync_group= or process_group=, not both (process_group= makes the group)")
            sync_group = sync_group_of(process_group)
        super().__init__()
        twin = self.torch_class(*args, **kwargs)
        for attribute in self.torch_class.__constants__:
            setattr(self, attribute, getattr(twin, attribute))
        for key, parameter in twin.named_parameters(recurse=False):
            self.register_parameter(key, parameter)
        for key in _PARAMETERS:
            if key not in self._parameters:
                self.register_parameter(key, None)
        for key, buffer in twin.named_buffers(recurse=False):
            self.register_buffer(key, buffer)
        if self._affine_has_bias and self.weight is not None and self.bias is None:
            raise InvalidArgument(
                f"{type(self).__name__}: bias=False is not supported: the server's {self.kind} layers have "
                "both a weight and a bias when affine"
            )
        self.client = client
        self.layer_name = name
        self.mode = mode
        # Only batch norm shares statistics across workers (as convert_sync_batchnorm converts only it): the
        # other kinds normalize each sample alone, so a group given to a whole model applies to its batch norms.
        self.sync_group = sync_group if self.kind == "batch_norm" else None
        #: Training forwards so far: the step number of the next synchronized step.
        self.sync_step = 0
        self._sent: dict[str, torch.Tensor] = {}  # parameter values the server holds (as last sent or read)
        self._updates: UpdateLog | None = None  # statistics mode: this module's updates in flight, and failures
        self._layer = client.create_layer(name, self.kind, **self._server_config(remote_device))
        if self._layer.version > 1:  # an existing layer with a history: its state wins
            self.pull()
        else:
            self._remember_sent()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.push())
        if mode == "statistics":  # the server sees parameters changed by local steps when the state is read
            self.register_state_dict_pre_hook(lambda module, _prefix, _keep_vars: module.sync_state())

    # ------------------------------------------------------------------ config
    def _server_config(self, remote_device: str | None) -> dict[str, Any]:
        config = self._constructor_args(self)  # the server takes torch's argument names
        dtype = _dtype_of(self)
        if dtype not in (None, torch.float32, torch.float64):
            raise InvalidArgument(
                f"{type(self).__name__}: the server keeps parameters in float32 or float64, not {dtype}; "
                "build the module in one of those (inputs may still be float16 or bfloat16)"
            )
        if dtype == torch.float64:
            config["dtype"] = "float64"
        if remote_device is not None:
            config["device"] = remote_device
        return config

    def extra_repr(self) -> str:
        return f"{self.torch_class.extra_repr(self)}, name={self.layer_name!r}"

    def _check_input_dim(self, x: torch.Tensor) -> None:
        check = getattr(self.torch_class, "_check_input_dim", None)
        if check is not None:
            check(self, x)

    @classmethod
    def _constructor_args(cls, module: nn.Module) -> dict[str, Any]:
        """The twin's constructor arguments, read off a torch (or remote) module."""
        return {arg: getattr(module, arg) for arg in cls.torch_class.__constants__}

    # ------------------------------------------------------------------ state
    @property
    def remote(self) -> Any:
        """The server layer's handle (a :class:`~normserve.client.RemoteLayer`)."""
        return self._layer

    def _remember_sent(self) -> None:
        self._sent = {key: p.detach().clone() for key in _PARAMETERS if (p := getattr(self, key)) is not None}

    def _changed_parameters(self) -> dict[str, torch.Tensor]:
        """Parameters whose values differ from what the server holds (all, when that is not known)."""
        return {
            key: p.detach()
            for key in _PARAMETERS
            if (p := getattr(self, key)) is not None
            and (key not in self._sent or not torch.equal(p.detach(), self._sent[key].to(p.device)))
        }

    def send_parameters(self) -> None:
        """Write the parameters to the server if they changed since it last saw them (else no call), after
        the statistics-mode updates in flight (which may carry earlier values)."""
        self.settle_updates()
        changed = self._changed_parameters()
        if changed:
            self._layer.load_state_dict(changed, strict=False)
            self._sent.update({key: value.clone() for key, value in changed.items()})

    def sync_state(self) -> None:
        """Bring the server up to date with this module and back (statistics mode: wait for the updates in
        flight, raise any that failed, send parameters stepped locally)."""
        self.send_parameters()

    def push(self) -> None:
        """Write this module's whole state (parameters, running statistics) to the server."""
        self.settle_updates()
        self._layer.load_state_dict({key: value.detach() for key, value in self.state_dict().items()})
        self._remember_sent()

    def pull(self) -> None:
        """Read the server's state into this module's parameters and buffers."""
        self.settle_updates()
        self._copy_in(self._layer.state_dict())
        self._remember_sent()

    # ------------------------------------------------------------------ statistics mode's updates in flight
    def _pipeline(self) -> StatisticsPipeline:
        return self.client._statistics_pipeline()

    def settle_updates(self) -> None:
        """Statistics mode: wait until this module's training updates in flight are stored, mirror the
        server's running statistics after them, and raise any that failed (naming their steps); the
        state reads (``state_dict``, eval forwards, ``convert_to_local``, ``sync_state``) do this first."""
        log = self._updates
        if log is None:
            return
        self._pipeline().wait(log)
        after = running_after(log)
        if after is not None:
            self._mirror(*after)
        self._raise_update_failure()

    def _raise_update_failure(self) -> None:
        """Raise what became of this module's failed updates, with the server's running statistics read back
        (each refused update changed nothing there); a server out of reach leaves them, and the parameters
        are sent again with the next update."""
        log = self._updates
        if log is None or not log.failed:
            return
        self._pipeline().wait(log)
        error = log.take_failure()
        assert error is not None
        self._sent = {}
        with contextlib.suppress(NormServeError):
            state = self._layer.state_dict()
            self._copy_in({key: value for key, value in state.items() if key in _RUNNING_KEYS})
            self.num_batches_tracked.fill_(int(state["num_batches_tracked"]))
            self._sent = {key: torch.as_tensor(state[key]) for key in _PARAMETERS if key in state}
        raise error

    def _copy_in(self, state: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for key, value in state.items():
                target = getattr(self, key)
                target.copy_(torch.as_tensor(np.asarray(value)).to(target.device))

    # ------------------------------------------------------------------ compute
    # torch.compile: the whole forward is one graph break. It makes service calls and keeps Python state that
    # must change once per call (step numbers, the parameters last sent, buffers mirrored from the answer);
    # Dynamo must not trace it, and the layers around it still compile (docs/pytorch.md, "Training jobs").
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        unbatched = x.dim() == getattr(self, "_no_batch_dim", -1)
        if unbatched:
            x = x.unsqueeze(0)
        if self.mode == "statistics":
            y = self._forward_with_statistics(x)
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.weight, self.bias) if t is not None):
            y = _RemoteFunction.apply(self, x, self.weight, self.bias)
        else:
            y = self._forward(x, keep=False)[0]
        return y.squeeze(0) if unbatched else y

    def _tracks(self) -> bool:
        return bool(getattr(self, "track_running_stats", False))

    def _next_sync(self) -> SyncGroup | None:
        sync = None if self.sync_group is None else self.sync_group.at(self.sync_step)
        self.sync_step += 1  # a failed step is gone for every rank: all move on
        return sync

    def _mirror(self, running: Mapping[str, np.ndarray], num_batches_tracked: int) -> None:
        self._copy_in(running)
        self.num_batches_tracked.fill_(num_batches_tracked)

    def _forward_with_statistics(self, x: torch.Tensor) -> torch.Tensor:
        """Statistics mode: torch computes. A training batch of a layer with running statistics updates them
        here as torch does and queues its per-group statistics (and changed parameters) for the server,
        without waiting (:mod:`~normserve.client.statistics_pipeline`). A synchronized batch norm's training
        batch waits for the step's statistics, and mirrors the running statistics that come back."""
        batch = self.training or not self._tracks()  # normalize with the batch's own statistics
        synchronized = self.training and self.sync_group is not None
        if not (self.training and self._tracks()) and not synchronized:
            self.settle_updates()  # eval: normalize with the server's running statistics after what is in flight
            return _LOCAL_FORWARD[self.kind](self, x, batch)  # these forwards change nothing on the server
        self._raise_update_failure()
        step = self.sync_step
        sync = self._next_sync()
        changed = self._changed_parameters()
        exact = x.dtype in (torch.float32, torch.float64)  # else torch's own forward, statistics in float32
        values = x if exact else x.detach().float()
        if sync is None:
            y, count, mean, m2 = _normalized(self, values, track=True)
            if self._updates is None:
                self._updates = UpdateLog(self._layer.info)
            self._pipeline().push(self._updates, step, count, mean, m2, changed)
            self._sent.update({key: value.clone() for key, value in changed.items()})
            return y if exact else _LOCAL_FORWARD[self.kind](self, x, batch)
        y, count, mean, m2 = _normalized(self, values.detach())
        result = self._layer.train_statistics(count, mean, m2, sync=sync, parameters=changed)
        self._sent.update({key: value.clone() for key, value in changed.items()})
        if result.running_mean is not None:  # this module's own answer, not a handle other modules may share
            running = {"running_mean": result.running_mean, "running_var": result.running_var}
            self._mirror(running, result.num_batches_tracked)
        return _SyncedStatistics.apply(self, x, self.weight, self.bias, result, sync)

    def _running(self, batch: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The running statistics a local forward normalizes with (None: the batch's own); never updated."""
        return (None, None) if batch else (self.running_mean, self.running_var)

    def _forward(self, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, _Forward]:
        """y from the server; keep: have it hold x for the backward."""
        if self.training:
            sync = self._next_sync()
            changed = self._changed_parameters()
            tracks = self._tracks()
            train = functools.partial(self._layer.train, x, parameters=changed, sync=sync, return_running_stats=tracks)
            try:
                y = train(keep_forward=keep)
            except ResourceExhausted:
                if not keep:
                    raise
                # x is over the server's --forward-cache-bytes (refused before any work): the
                # backward sends x instead
                y, keep = train(keep_forward=False), False
            self._sent.update({key: value.clone() for key, value in changed.items()})
            if tracks:
                self._mirror(self._layer.running_stats, self._layer.info.num_batches_tracked)
            forward = _Forward(True, self._layer.forward_id if keep else None, sync)
        else:
            self.send_parameters()  # once after they changed; Infer calls never carry them
            y = self._layer.infer(x)
            forward = _Forward(False, None, None)
        return _tensor(y, x), forward

    def _backward(self, x: torch.Tensor, dy: torch.Tensor, forward: _Forward) -> tuple[Any, Any, Any]:
        gradient: Callable[..., Any] = self._layer.gradient
        kept = forward.forward_id
        try:
            dx, dweight, dbias = gradient(None if kept else x, dy, forward.training, forward_id=kept, sync=forward.sync)
        except FailedPrecondition:
            if not kept:
                raise
            # the server dropped the kept forward (least recently used, to stay in its budget): send x
            dx, dweight, dbias = gradient(x, dy, forward.training, sync=forward.sync)
        return tuple(
            None if g is None else _tensor(g, like) for g, like in ((dx, x), (dweight, self.weight), (dbias, self.bias))
        )

    @classmethod
    def from_torch(
        cls, module: nn.Module, client: Any, name: str, existing: str = "refuse", **options: Any
    ) -> RemoteNorm:
        """The remote twin of a torch module: same config, same Parameter objects, its state on the server.

        ``existing`` says what happens when the server's layer ``name`` already has a history (it was trained
        or loaded) and its state differs from the module's: ``"refuse"`` (the default: nothing is changed,
        :class:`ExistingLayerError` says what differs), ``"adopt"`` (the module takes the server's state: resume
        a run) or ``"overwrite"`` (the server takes the module's). Equal states (data-parallel replicas
        converting the same model) never conflict.
        """
        if existing not in EXISTING:
            raise InvalidArgument(f"existing must be one of {EXISTING}, got {existing!r}")
        factory = {"device": None, "dtype": _dtype_of(module)}
        remote = cls(**cls._constructor_args(module), **factory, client=client, name=name, **options)
        server = remote.state_dict() if remote.remote.version > 1 else None  # pulled: the server's state
        _adopt(remote, module)
        if server is not None and existing == "adopt":
            remote._copy_in({key: value.cpu().numpy() for key, value in server.items()})
            remote._remember_sent()
            return remote
        if server is not None and existing == "refuse":
            differ = [key for key, value in module.state_dict().items() if not torch.equal(value.cpu(), server[key])]
            if differ:
                raise ExistingLayerError(
                    f"the server's layer {name!r} already has a history (version {remote.remote.version}) and its "
                    f"{', '.join(differ)} differ from the module's; nothing was changed. Pass existing='adopt' to "
                    "continue from the server's state (resuming from a checkpoint: adopt, then load_state_dict), "
                    "existing='overwrite' to replace it with the module's, or another prefix (or none: new names)"
                )
        remote.push()
        return remote

    def to_torch(self) -> nn.Module:
        """The local torch twin: this module's parameters, and the server's running statistics."""
        self.send_parameters()  # after the updates in flight
        self.pull()
        return self._local_twin()

    def _local_twin(self) -> nn.Module:
        """The torch twin holding this module's own Parameter objects and buffers (no call)."""
        module = self.torch_class(**self._constructor_args(self), dtype=_dtype_of(self))
        _adopt(module, self)
        return module

    def __reduce_ex__(self, protocol: Any) -> Any:
        """A copy (``copy.deepcopy``, pickle, ``torch.save``) is the torch twin with this module's current
        parameters and mirrored buffers: it computes locally and can never change this module's server layer
        (an EMA or SWA copy, a teacher, a snapshot). ``convert_to_remote`` puts a copy on a server again."""
        self.settle_updates()  # a copy reads the state: what is in flight first
        return _copied, (self._local_twin(),)  # pickle or deepcopy copy the twin itself, then _copied returns it


def _copied(module: nn.Module) -> nn.Module:
    """A copy of a remote module, unpickled or deep-copied: its torch twin (see RemoteNorm.__reduce_ex__)."""
    return module


class _RemoteFunction(torch.autograd.Function):
    """Forward on the server with the forward kept there; backward from it (dx, dweight, dbias)."""

    @staticmethod
    def forward(ctx: Any, module: RemoteNorm, x: torch.Tensor, weight: Any, bias: Any) -> torch.Tensor:
        y, ctx.remote_forward = module._forward(x, keep=True)
        ctx.module = module
        ctx.save_for_backward(x)  # to resend if the server dropped the kept forward
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        (x,) = ctx.saved_tensors
        return (None, *ctx.module._backward(x, dy, ctx.remote_forward))


_F = torch.nn.functional
#: Statistics mode's local forward of each kind: torch's functional form, the running statistics read only.
_LOCAL_FORWARD: dict[str, Callable[[Any, torch.Tensor, bool], torch.Tensor]] = {
    "batch_norm": lambda m, x, batch: _F.batch_norm(x, *m._running(batch), m.weight, m.bias, batch, 0.0, m.eps),
    "instance_norm": lambda m, x, batch: _F.instance_norm(x, *m._running(batch), m.weight, m.bias, batch, 0.0, m.eps),
    "group_norm": lambda m, x, batch: _F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps),
    "layer_norm": lambda m, x, batch: _F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps),
    "rms_norm": lambda m, x, batch: _F.rms_norm(x, m.normalized_shape, m.weight, m.eps),
}


class _SyncedStatistics(torch.autograd.Function):
    """SyncBatchNorm's math in torch, with the step's statistics and backward sums combined by the server."""

    @staticmethod
    def forward(
        ctx: Any, module: RemoteNorm, x: torch.Tensor, weight: Any, bias: Any, step: Any, sync: SyncGroup
    ) -> torch.Tensor:
        compute = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.as_tensor(step.mean, dtype=compute, device=x.device).view(shape)
        invstd = torch.rsqrt(torch.as_tensor(step.var, dtype=compute, device=x.device).view(shape) + module.eps)
        y = (x.to(compute) - mean) * invstd
        if weight is not None:
            y = y * weight.view(shape) + bias.view(shape)
        ctx.save_for_backward(x, weight)
        ctx.module, ctx.sync, ctx.mean, ctx.invstd, ctx.compute = module, sync, mean, invstd, compute
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        xmu, dyc = x.to(ctx.compute) - ctx.mean, dy.to(ctx.compute)
        sum_dy, sum_dy_xmu = dyc.sum(dims), (dyc * xmu).sum(dims)
        # As SyncBatchNorm: this rank's own parameter gradients (DDP sums them over the ranks).
        dweight = None if weight is None else (sum_dy_xmu * ctx.invstd.view(-1)).to(weight.dtype)
        dbias = None if weight is None else sum_dy.to(weight.dtype)
        if not ctx.needs_input_grad[1]:  # no dx wanted (frozen inputs): no rank asks for the combined sums
            return None, None, dweight, dbias, None, None
        step = ctx.module._layer.gradient_statistics(x.numel() // x.shape[1], sum_dy, sum_dy_xmu, sync=ctx.sync)
        mean_dy, mean_dy_xmu = (
            torch.as_tensor(total / step.count, dtype=ctx.compute, device=x.device).view_as(ctx.mean)
            for total in (step.sum_dy, step.sum_dy_xmu)
        )
        scale = ctx.invstd if weight is None else ctx.invstd * weight.view_as(ctx.mean)
        dx = (dyc - mean_dy - xmu * ctx.invstd * ctx.invstd * mean_dy_xmu) * scale
        return None, dx.to(x.dtype), dweight, dbias, None, None


def _normalized(
    module: RemoteNorm, x: torch.Tensor, track: bool = False
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """torch's training-mode normalization of ``x`` (autograd intact) and the statistics it used: the values
    per group, each group's mean and m2 (float64); groups are channels, or each sample's channels for
    instance norm, in (N, C) order. ``track``: also update the module's running statistics (and count of
    batches) exactly as its torch twin's training forward does, in the same call.

    One pass: torch's batch norm also returns each group's mean and 1 / sqrt(var + eps), from which the
    variance is recovered in float64, as torch.nn.SyncBatchNorm recovers it (torch.var_mean would be a second,
    and on a CPU slower, pass).
    """
    weight, bias, view = module.weight, module.bias, x
    running = (module.running_mean, module.running_var) if track else (None, None)
    momentum = _momentum(module) if track else 0.0
    instance = module.kind == "instance_norm"
    if instance:  # batch norm of (1, N * C, *spatial), as torch computes instance norm
        n, c = x.shape[:2]
        view = x.reshape(1, n * c, *x.shape[2:])
        weight, bias, repeated = (None if p is None else p.repeat(n) for p in (weight, bias, running[0]))
        running_of_view = (repeated, None if running[1] is None else running[1].repeat(n))
    else:
        running_of_view = running
    y, mean, invstd = torch.native_batch_norm(view, weight, bias, *running_of_view, True, momentum, module.eps)
    if track and instance:  # each channel's running statistics: the mean over the samples' (as torch)
        with torch.no_grad():
            for target, updated in zip(running, running_of_view, strict=True):
                target.copy_(updated.view(n, c).mean(0))
    count = view.numel() // view.shape[1]
    with torch.no_grad():
        var = (invstd.double().pow(-2) - module.eps).clamp_min(0)
        if bool((var < module.eps).any()):  # invstd no longer carries the variance's digits: compute it
            var = torch.var_mean(view.detach().double(), dim=[0, *range(2, view.dim())], correction=0)[0]
    return y.reshape(x.shape), count, mean.detach().double(), var * count


def _momentum(module: RemoteNorm) -> float:
    """The running statistics' update factor of a training forward, as the torch twin's forward takes it
    (counting the batch first for batch norm: momentum=None averages over all batches)."""
    if module.kind == "batch_norm":
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            return 1.0 / float(module.num_batches_tracked)
    return 0.0 if module.momentum is None else module.momentum


def _tensor(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A client result as a tensor on ``like``'s device, in its dtype (bfloat16 arrives as ml_dtypes')."""
    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to(device=like.device, dtype=like.dtype)


def _dtype_of(module: nn.Module) -> torch.dtype | None:
    """The dtype of a module's float parameters and buffers (None when it has none)."""
    tensors = (*module.parameters(recurse=False), *module.buffers(recurse=False))
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def _adopt(target: nn.Module, source: nn.Module) -> None:
    """Give ``target`` the very Parameter objects and buffers of ``source`` (optimizers keep working), and its mode."""
    for key, parameter in source.named_parameters(recurse=False):
        setattr(target, key, parameter)
    for key, buffer in source.named_buffers(recurse=False):
        setattr(target, key, buffer)
    target.train(source.training)


class RemoteBatchNorm1d(RemoteNorm):
    torch_class, kind = nn.BatchNorm1d, "batch_norm"


class RemoteBatchNorm2d(RemoteNorm):
    torch_class, kind = nn.BatchNorm2d, "batch_norm"


class RemoteBatchNorm3d(RemoteNorm):
    torch_class, kind = nn.BatchNorm3d, "batch_norm"


class RemoteInstanceNorm1d(RemoteNorm):
    torch_class, kind, _no_batch_dim = nn.InstanceNorm1d, "instance_norm", 2


class RemoteInstanceNorm2d(RemoteNorm):
    torch_class, kind, _no_batch_dim = nn.InstanceNorm2d, "instance_norm", 3


class RemoteInstanceNorm3d(RemoteNorm):
    torch_class, kind, _no_batch_dim = nn.InstanceNorm3d, "instance_norm", 4


class RemoteGroupNorm(RemoteNorm):
    torch_class, kind = nn.GroupNorm, "group_norm"


class RemoteLayerNorm(RemoteNorm):
    torch_class, kind = nn.LayerNorm, "layer_norm"
    _affine_has_bias = False

    @classmethod
    def _constructor_args(cls, module: nn.Module) -> dict[str, Any]:
        return {**super()._constructor_args(module), "bias": module.bias is not None or not module.elementwise_affine}


class RemoteRMSNorm(RemoteNorm):
    torch_class, kind = nn.RMSNorm, "rms_norm"
    _affine_has_bias = False


#: torch module class -> its remote twin.
REMOTE_TWINS: dict[type[nn.Module], type[RemoteNorm]] = {
    cls.torch_class: cls
    for cls in (
        RemoteBatchNorm1d,
        RemoteBatchNorm2d,
        RemoteBatchNorm3d,
        RemoteInstanceNorm1d,
        RemoteInstanceNorm2d,
        RemoteInstanceNorm3d,
        RemoteGroupNorm,
        RemoteLayerNorm,
        RemoteRMSNorm,
    )
}


def convert_to_remote(model: nn.Module, client: Any, prefix: str | None = None, **options: Any) -> nn.Module:
    """Swap every torch normalization layer of ``model`` for its remote twin; returns the model.

    Layers are named ``prefix`` + their module path (``"encoder.layers.0.norm1"``),
    keep their Parameter objects (an optimizer made before still works) and
    copy their state to the server. Without a prefix the names are new ones,
    ``<ModelClass>-<8 random hex digits>.<path>``, so that two models never
    share a layer by accident; give a prefix to find the layers again (resume
    a run, serve a trained model). ``options`` go to every twin
    (``sync_group=``, ``process_group=``, ``remote_device=``, ``mode=``,
    ``existing=``: see :meth:`RemoteNorm.from_torch`; a layer that already has a
    different, trained state on the server is refused by default).
    ``process_group=`` (a torch.distributed group, or ``"world"``) makes the
    batch norms one sync group of that process group's ranks
    (:func:`sync_group_of`, one collective call): every rank converts, in the
    same order. Like ``convert_sync_batchnorm``, a model that is itself a
    normalization layer comes back converted.
    """
    process_group = options.pop("process_group", None)
    default = None if prefix is not None else _unique_name(model)
    if process_group is not None:
        if options.get("sync_group") is not None:
            raise InvalidArgument("give sync_group= or process_group=, not both (process_group= makes the group)")
        options["sync_group"], default = _agreed(process_group, default)
    if default is not None:  # the lone layer is named by the unique name itself
        return _convert(model, "", lambda module, path: _to_remote(module, client, _joined(default, path), options))
    return _convert(model, "", lambda module, path: _to_remote(module, client, prefix + path, options))


def _unique_name(model: nn.Module) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', type(model).__name__)}-{uuid.uuid4().hex[:8]}"


def _joined(base: str, path: str) -> str:
    return f"{base}.{path}" if path else base


#: ``process_group="world"``: torch.distributed's default group (what ``torch.nn.SyncBatchNorm`` uses by default).
WORLD = "world"


def sync_group_of(process_group: Any = WORLD) -> SyncGroup:
    """This rank's :class:`SyncGroup` in an initialized torch.distributed process group (default: the world).

    Rank and world size are the process group's; the id is made by the group's
    rank 0 and broadcast, so every rank has the same one, and every call (so
    every run, and every restarted attempt of a run) a new one: a new
    attempt's steps never meet an earlier attempt's. A collective call: every
    rank of the group makes it, in the same order (as it builds its model).
    """
    return _agreed(process_group, None)[0]


def _agreed(process_group: Any, proposal: str | None) -> tuple[SyncGroup, str | None]:
    """(This rank's SyncGroup of ``process_group``, rank 0's ``proposal``): one broadcast from rank 0."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgument(
            "process_group= needs torch.distributed initialized first (torch.distributed.init_process_group, "
            "as every torchrun worker calls it); without it, give sync_group=SyncGroup(id, world_size, rank)"
        )
    group = dist.group.WORLD if process_group == WORLD else process_group
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise InvalidArgument("this process is not a member of the process_group it gave")
    agreed = [f"torch-{uuid.uuid4().hex[:16]}", proposal] if rank == 0 else [None, None]
    dist.broadcast_object_list(agreed, src=dist.get_global_rank(group, 0), group=group)
    return SyncGroup(agreed[0], world_size=world_size, rank=rank), agreed[1]


def realign_sync_steps(model: nn.Module, process_group: Any = WORLD) -> None:
    """Give every rank's synchronized batch norms the same step numbers again (a collective call).

    After a rank ran a training forward the others did not (a validation pass
    left in train mode), the server fails the steps the ranks wait in at
    different numbers (ABORTED, naming each rank's step); calling this on every
    rank then moves each layer's :attr:`RemoteNorm.sync_step` to the highest any
    rank has reached, above every step used, and training goes on.
    """
    import torch.distributed as dist

    modules = [m for m in model.modules() if isinstance(m, RemoteNorm) and m.sync_group is not None]
    group = dist.group.WORLD if process_group == WORLD else process_group
    ranks: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(ranks, [m.sync_step for m in modules], group=group)  # any backend, any device
    for module, *steps in zip(modules, *ranks, strict=True):
        module.sync_step = max(steps)


def settle_updates(model: nn.Module) -> None:
    """Wait until every statistics-mode training update of ``model``'s remote layers is stored, and raise
    the first that failed (naming its steps); what every state read of a module does for that module."""
    for module in model.modules():
        if isinstance(module, RemoteNorm):
            module.settle_updates()


def convert_to_local(model: nn.Module) -> nn.Module:
    """Swap every remote normalization layer of ``model`` back for its torch twin, with the server's state."""
    return _convert(model, "", lambda module, path: module.to_torch() if isinstance(module, RemoteNorm) else None)


def _to_remote(module: nn.Module, client: Any, name: str, options: Mapping[str, Any]) -> nn.Module | None:
    twin = REMOTE_TWINS.get(type(module))
    if twin is None:
        return None
    if not name:
        raise InvalidArgument(
            "converting a lone normalization layer with prefix='' leaves it no name: give a prefix (its name on "
            "the server), or none (a new name)"
        )
    return twin.from_torch(module, client, name, **options)


def _convert(module: nn.Module, path: str, swap: Callable[[nn.Module, str], nn.Module | None]) -> nn.Module:
    swapped = swap(module, path)
    if swapped is not None:
        return swapped
    for child_name, child in module.named_children():
        new = _convert(child, f"{path}{child_name}" if not path else f"{path}.{child_name}", swap)
        if new is not child:
            module.add_module(child_name, new)
    return module
