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
to the batch norm modules of each data-parallel worker: their training
forwards and backwards become steps of that group, numbered by the module's
own count of training forwards (:attr:`RemoteNorm.sync_step`), so every rank
must run the same number of them, as with DistributedDataParallel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import torch
from torch import nn

from normserve.client.errors import FailedPrecondition, ResourceExhausted
from normserve.client.protocol import SyncGroup

__all__ = [
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
]

_PARAMETERS = ("weight", "bias")


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
        remote_device: str | None = None,
        **kwargs: Any,
    ) -> None:
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
            raise ValueError(
                f"{type(self).__name__}: bias=False is not supported: the server's {self.kind} layers have "
                "both a weight and a bias when affine"
            )
        self.client = client
        self.layer_name = name
        self.sync_group = sync_group
        #: Training forwards so far: the step number of the next synchronized step.
        self.sync_step = 0
        self._sent: dict[str, torch.Tensor] = {}  # parameter values the server holds (as last sent or read)
        self._layer = client.create_layer(name, self.kind, **self._server_config(remote_device))
        if self._layer.version > 1:  # an existing layer with a history: its state wins
            self.pull()
        else:
            self._remember_sent()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.push())

    # ------------------------------------------------------------------ config
    def _server_config(self, remote_device: str | None) -> dict[str, Any]:
        config = self._constructor_args(self)  # the server takes torch's argument names
        dtype = _dtype_of(self)
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
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
        """Parameters whose values differ from what the server holds."""
        return {
            key: p.detach()
            for key in _PARAMETERS
            if (p := getattr(self, key)) is not None and not torch.equal(p.detach(), self._sent[key].to(p.device))
        }

    def send_parameters(self) -> None:
        """Write the parameters to the server if they changed since it last saw them (else no call)."""
        changed = self._changed_parameters()
        if changed:
            self._layer.load_state_dict(changed, strict=False)
            self._sent.update({key: value.clone() for key, value in changed.items()})

    def push(self) -> None:
        """Write this module's whole state (parameters, running statistics) to the server."""
        self._layer.load_state_dict({key: value.detach() for key, value in self.state_dict().items()})
        self._remember_sent()

    def pull(self) -> None:
        """Read the server's state into this module's parameters and buffers."""
        self._copy_in(self._layer.state_dict())
        self._remember_sent()

    def _copy_in(self, state: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for key, value in state.items():
                target = getattr(self, key)
                target.copy_(torch.as_tensor(np.asarray(value)).to(target.device))

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        unbatched = x.dim() == getattr(self, "_no_batch_dim", -1)
        if unbatched:
            x = x.unsqueeze(0)
        tensors = [t for t in (x, self.weight, self.bias) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            y = _RemoteFunction.apply(self, x, self.weight, self.bias)
        else:
            y = self._forward(x, keep=False)[0]
        return y.squeeze(0) if unbatched else y

    def _forward(self, x: torch.Tensor, keep: bool) -> tuple[torch.Tensor, _Forward]:
        """y from the server; keep: have it hold x for the backward."""
        if self.training:
            sync = None if self.sync_group is None else self.sync_group.at(self.sync_step)
            self.sync_step += 1  # a failed step is gone for every rank: all move on
            changed = self._changed_parameters()
            tracks = bool(getattr(self, "track_running_stats", False))
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
                self._copy_in(self._layer.running_stats)
                self.num_batches_tracked.fill_(self._layer.info.num_batches_tracked)
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
    def from_torch(cls, module: nn.Module, client: Any, name: str, **options: Any) -> RemoteNorm:
        """The remote twin of a torch module: same config, same Parameter objects, its state on the server."""
        factory = {"device": None, "dtype": _dtype_of(module)}
        remote = cls(**cls._constructor_args(module), **factory, client=client, name=name, **options)
        _adopt(remote, module)
        remote.push()
        return remote

    def to_torch(self) -> nn.Module:
        """The local torch twin: this module's parameters, and the server's running statistics."""
        self.send_parameters()
        self.pull()
        module = self.torch_class(**self._constructor_args(self), dtype=_dtype_of(self))
        _adopt(module, self)
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


def convert_to_remote(model: nn.Module, client: Any, prefix: str = "", **options: Any) -> nn.Module:
    """Swap every torch normalization layer of ``model`` for its remote twin; returns the model.

    Layers are named ``prefix`` + their module path (``"encoder.layers.0.norm1"``),
    keep their Parameter objects (an optimizer made before still works) and
    copy their state to the server. ``options`` go to every twin
    (``sync_group=``, ``remote_device=``). Like ``convert_sync_batchnorm``, a
    model that is itself a normalization layer comes back converted.
    """
    return _convert(model, "", lambda module, path: _to_remote(module, client, prefix + path, options))


def convert_to_local(model: nn.Module) -> nn.Module:
    """Swap every remote normalization layer of ``model`` back for its torch twin, with the server's state."""
    return _convert(model, "", lambda module, path: module.to_torch() if isinstance(module, RemoteNorm) else None)


def _to_remote(module: nn.Module, client: Any, name: str, options: Mapping[str, Any]) -> nn.Module | None:
    twin = REMOTE_TWINS.get(type(module))
    if twin is None:
        return None
    if not name:
        raise ValueError("converting a lone normalization layer needs a prefix: it is the layer's name on the server")
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
