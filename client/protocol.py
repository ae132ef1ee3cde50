"""What both clients share: arrays in and out, request building, response decoding, retries.

Nothing here performs I/O, so :mod:`normserve.client.sync` and
:mod:`normserve.client.aio` differ only in how they wait for a call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ml_dtypes
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

__all__ = [
    "IDEMPOTENT_METHODS",
    "ClientBase",
    "LayerHandle",
    "RetryPolicy",
    "as_numpy",
    "channel_credentials",
    "forward_request",
    "gradient_request",
    "gradient_result",
    "health_status",
    "layer_config",
    "load_state_request",
    "state_dict",
]

DEFAULT_TARGET = "localhost:50051"

#: Methods that are safe to resend after UNAVAILABLE: they change nothing, or
#: (CreateLayer) are idempotent by design. Train, SetState and DeleteLayer
#: are not retried: a lost reply may hide an applied update.
IDEMPOTENT_METHODS = frozenset(
    {"CreateLayer", "GetLayer", "ListLayers", "Infer", "Gradient", "GetState", "Health/Check"}
)

_STATE_ORDER = ("weight", "bias", "running_mean", "running_var")  # PyTorch's state_dict order

# Python argument (PyTorch's names) -> LayerConfig field.
_CONFIG_FIELDS = {
    "num_features": "num_features",
    "num_channels": "num_features",
    "num_groups": "num_groups",
    "normalized_shape": "normalized_shape",
    "eps": "eps",
    "momentum": "momentum",
    "affine": "affine",
    "elementwise_affine": "affine",
    "track_running_stats": "track_running_stats",
    "bias": "bias",
    "biased_running_var": "biased_running_var",
    "device": "device",
}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for UNAVAILABLE on idempotent methods (``attempts`` counts the first try)."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoffs(self, method: str) -> list[float]:
        """Seconds to wait before each retry of ``method``; empty when it is never retried."""
        if method not in IDEMPOTENT_METHODS:
            return []
        return [min(self.max_backoff, self.initial_backoff * self.multiplier**i) for i in range(self.attempts - 1)]


Pem = bytes | str | os.PathLike | None  # PEM contents, or the path of a PEM file


def _pem(value: Pem) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def channel_credentials(
    ca_cert: Pem = None, client_cert: Pem = None, client_key: Pem = None
) -> grpc.ChannelCredentials:
    """TLS credentials: ``ca_cert`` verifies the server (None: the system's roots); a client
    certificate and key (both or neither) answer a server that requires mutual TLS."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together: give both (mutual TLS) or neither")
    return grpc.ssl_channel_credentials(_pem(ca_cert), _pem(client_key), _pem(client_cert))


class ClientBase:
    """Settings and channel shared by both clients; subclasses say how a channel is made."""

    _grpc: Any  # grpc or grpc.aio: where the channel constructors come from

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 60.0,
        wire_dtype: Any = None,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: bool | None = None,
        ca_cert: Pem = None,
        client_cert: Pem = None,
        client_key: Pem = None,
        server_name: str | None = None,
        max_message_bytes: int = (1 << 31) - 1,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wire_dtype = wire_dtype
        self.retry = retry or RetryPolicy()
        self._metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *channel_options,
        ]
        if server_name is not None:  # the name the server's certificate carries, when the target differs
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls is None:
            tls = any(v is not None for v in (ca_cert, client_cert, client_key, server_name))
        if tls:
            credentials = channel_credentials(ca_cert, client_cert, client_key)
            self._channel = self._grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = self._grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.NormalizationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _rpc(self, method: str) -> Any:
        """The stub method for ``method`` (a Normalization method, or ``Health/Check``)."""
        if method.startswith("Health/"):
            return getattr(self._health, method.removeprefix("Health/"))
        return getattr(self._stub, method)


class LayerHandle:
    """What a remote layer handle knows without a call: its last description and defaults."""

    def __init__(self, client: Any, info: pb.Layer) -> None:
        self._client = client
        #: The layer's description from the last call that returned one.
        self.info = info

    name = property(lambda self: self.info.name)
    kind = property(lambda self: pb.Kind.Name(self.info.config.kind).lower())
    version = property(lambda self: self.info.version)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, version={self.version})"

    def _wire(self, wire_dtype: Any) -> Any:
        return self._client.wire_dtype if wire_dtype is None else wire_dtype

    def _forward_result(self, response: Any, dtype: np.dtype) -> np.ndarray:
        """y from a Train/Infer response; ``info`` learns the version (and batch count) it reports."""
        self.info.version = response.version
        if isinstance(response, pb.TrainResponse):
            self.info.num_batches_tracked = response.num_batches_tracked
        return output_array(response.y, dtype)


# ---------------------------------------------------------------------- arrays
def as_numpy(x: Any) -> np.ndarray:
    """A NumPy view or copy of a NumPy array, CuPy array or torch tensor (any device)."""
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        import torch  # already imported by whoever made the tensor

        tensor = x.detach().cpu()
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16; ml_dtypes does
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()
    if module == "cupy":
        return x.get()
    return np.asarray(x)


def _wire_enum(wire_dtype: Any) -> int:
    return pb.DTYPE_UNSPECIFIED if wire_dtype is None else codec.dtype_enum(wire_dtype)


def input_tensor(x: Any, wire_dtype: Any) -> tuple[pb.Tensor, np.dtype, int]:
    """(Tensor to send, dtype to return results in, output dtype to ask for)."""
    array = as_numpy(x)
    enum = _wire_enum(wire_dtype)
    return codec.encode(array, enum), array.dtype, enum


def output_array(tensor: pb.Tensor, dtype: np.dtype) -> np.ndarray:
    """A writable array in the caller's dtype (the wire dtype is a transport detail)."""
    return codec.decode(tensor).astype(dtype)


# ---------------------------------------------------------------------- requests and results
def health_status(response: health_pb2.HealthCheckResponse) -> str:
    """``"SERVING"``, ``"NOT_SERVING"``, ... from a health check answer."""
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def layer_config(kind: str, **kwargs: Any) -> pb.LayerConfig:
    """A LayerConfig from PyTorch-style arguments: ``layer_config("group_norm", num_groups=4, num_channels=32)``."""
    try:
        config = pb.LayerConfig(kind=pb.Kind.Value(kind.upper()))
    except ValueError:
        kinds = sorted(k.lower() for k in pb.Kind.keys() if k != "KIND_UNSPECIFIED")  # noqa: SIM118
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {kinds}") from None
    for arg, value in kwargs.items():
        if arg == "dtype":
            config.param_dtype = codec.dtype_enum(value)
        elif arg not in _CONFIG_FIELDS:
            raise TypeError(f"unexpected argument {arg!r} for a layer config; known: {sorted(_CONFIG_FIELDS)} + dtype")
        elif arg == "momentum" and value is None:
            config.cumulative_average = True
        elif value is None:  # e.g. RMSNorm's eps=None: the server's default
            continue
        elif arg == "normalized_shape":
            config.normalized_shape.extend([value] if isinstance(value, int) else value)
        else:
            setattr(config, _CONFIG_FIELDS[arg], value)
    return config


_FORWARD_REQUESTS = {"Train": pb.TrainRequest, "Infer": pb.InferRequest}


def forward_request(method: str, name: str, x: Any, wire_dtype: Any) -> tuple[Any, np.dtype]:
    """A Train or Infer request, and the dtype to return y in."""
    tensor, dtype, out = input_tensor(x, wire_dtype)
    return _FORWARD_REQUESTS[method](layer=name, x=tensor, output_dtype=out), dtype


def gradient_request(
    name: str, x: Any, dy: Any, training: bool, wire_dtype: Any
) -> tuple[pb.GradientRequest, np.dtype]:
    x_tensor, dtype, out = input_tensor(x, wire_dtype)
    dy_tensor, _, _ = input_tensor(dy, wire_dtype)
    request = pb.GradientRequest(layer=name, x=x_tensor, dy=dy_tensor, training=training, output_dtype=out)
    return request, dtype


def gradient_result(
    response: pb.GradientResponse, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(dx in the input's dtype, dweight, dbias in the layer's param dtype or None)."""
    dx = output_array(response.dx, dtype)
    dweight = codec.decode(response.dweight).copy() if response.HasField("dweight") else None
    dbias = codec.decode(response.dbias).copy() if response.HasField("dbias") else None
    return dx, dweight, dbias


def state_dict(state: pb.LayerState) -> dict[str, np.ndarray]:
    """PyTorch-style state dict: float tensors plus ``num_batches_tracked`` as an int64 scalar."""
    keys = sorted(state.tensors, key=lambda k: _STATE_ORDER.index(k) if k in _STATE_ORDER else len(_STATE_ORDER))
    result = {key: codec.decode(state.tensors[key]).copy() for key in keys}
    if state.HasField("num_batches_tracked"):
        result["num_batches_tracked"] = np.array(state.num_batches_tracked, dtype=np.int64)
    return result


def load_state_request(
    name: str, state: Mapping[str, Any], strict: bool, expected_version: int | None
) -> pb.SetStateRequest:
    request = pb.SetStateRequest(name=name, partial=not strict)
    for key, value in state.items():
        array = as_numpy(value)
        if key == "num_batches_tracked":
            request.num_batches_tracked = int(array.reshape(()))
        else:
            request.tensors[key].CopyFrom(codec.encode(array))
    if expected_version is not None:
        request.expected_version = expected_version
    return request
