"""What both clients share below their methods: arrays in and out, request building, response decoding,
retry policy, channel settings. Nothing here performs I/O; the methods themselves are the plans of
:mod:`normserve.client.operations`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.client.errors import InvalidArgument, MalformedAnswer, UnknownArgument
from normserve.v1 import codec, kinds, routing, wire
from normserve.v1 import normalization_pb2 as pb

__all__ = [
    "DEFAULT_STREAM_THRESHOLD",
    "DEFAULT_TARGET",
    "IDEMPOTENT_METHODS",
    "SERVICE_NAME",
    "STREAMABLE_METHODS",
    "AnswerAssembly",
    "ClientBase",
    "LayerHandle",
    "LayerInfo",
    "Pem",
    "Request",
    "RetryPolicy",
    "SharedMemoryRegion",
    "StepSums",
    "SyncGroup",
    "TrainedStatistics",
    "as_numpy",
    "channel_credentials",
    "check_answer",
    "config_arguments",
    "expected_outputs",
    "forward_request",
    "gradient_request",
    "gradient_result",
    "gradient_statistics_request",
    "health_status",
    "input_tensor",
    "layer_config",
    "layer_info",
    "load_state_request",
    "next_page",
    "output_array",
    "parameter_like",
    "reading_answer",
    "running_stats",
    "state_dict",
    "statistics_update",
    "step_sums",
    "train_options",
    "train_statistics_request",
    "trained_statistics",
]

DEFAULT_TARGET = "localhost:50051"
#: The gRPC service the clients call (also a name the health service reports on).
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Normalization"].full_name
#: Train/Infer/Gradient requests with at least this many tensor bytes use the streaming RPCs:
#: on loopback they beat one large message from about 4 MB up (benchmarks/RESULTS.md).
DEFAULT_STREAM_THRESHOLD = 4 << 20

#: Methods that are safe to resend after UNAVAILABLE: they change nothing, or
#: (CreateLayer) are idempotent by design. Train, SetState and DeleteLayer
#: are not retried: a lost reply may hide an applied update.
IDEMPOTENT_METHODS = frozenset(
    {
        "CreateLayer",
        "GetLayer",
        "ListLayers",
        "Infer",
        "Gradient",
        "GetState",
        "Health/Check",
        "RegisterSharedMemory",
        "ListSharedMemory",
    }
)
#: Methods with a streaming form (``<name>Stream``) for large tensors.
STREAMABLE_METHODS = frozenset({"Train", "Infer", "Gradient"})

_STATE_ORDER = ("weight", "bias", "running_mean", "running_var")  # PyTorch's state_dict order

# Python argument (PyTorch's names) -> LayerConfig field.


def _checks_arguments(function: Callable[..., Any]) -> Callable[..., Any]:
    """A request builder whose refusals of the caller's arrays (the codec's TensorError) are InvalidArgument,
    as every client-side check's."""

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except codec.TensorError as error:
            raise InvalidArgument(str(error)) from None

    return checked


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


@dataclass(frozen=True)
class SyncGroup:
    """A rank's place in a group of data-parallel workers that share batch statistics through the server.

    ``SyncGroup("job-7", world_size=4, rank=r)`` on every worker, then
    ``layer.train(x, sync=group.at(step))`` and ``layer.gradient(..., sync=group.at(step))``
    with the same step number on all ranks: the server combines the ranks'
    batches as torch.nn.SyncBatchNorm does (batch norm layers only).
    """

    id: str
    world_size: int
    rank: int
    step: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise InvalidArgument(f"rank {self.rank} must be in [0, world_size) = [0, {self.world_size})")

    def at(self, step: int) -> SyncGroup:
        """This group at training step ``step``."""
        return replace(self, step=step)

    def message(self) -> pb.SyncGroup:
        return pb.SyncGroup(id=self.id, world_size=self.world_size, rank=self.rank, step=self.step)


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
        raise InvalidArgument("client_cert and client_key go together: give both (mutual TLS) or neither")
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
        stream_threshold: int = DEFAULT_STREAM_THRESHOLD,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wire_dtype = wire_dtype
        self.retry = retry or RetryPolicy()
        #: Train/Infer/Gradient calls whose tensors carry at least this many bytes stream them
        #: in ``chunk_bytes`` pieces (beyond one message's 2 GB ceiling they must).
        self.stream_threshold = min(stream_threshold, max_message_bytes // 2)
        self.chunk_bytes = chunk_bytes
        self._regions: dict[str, SharedMemoryRegion] = {}
        self._pipeline: Any = None  # the blocking client's StatisticsPipeline, made on first use
        if token is not None and not (token.isascii() and token.isprintable() and " " not in token and token):
            raise ValueError("token must be printable ASCII without spaces (it travels as a header)")
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
        self._calls = {
            m.name: (self._channel.stream_stream if m.streaming else self._channel.unary_unary)(
                m.path,
                request_serializer=wire.serializer(m.request_type),
                response_deserializer=wire.parser(m.response_type),
            )
            for m in wire.methods(pb.DESCRIPTOR.services_by_name["Normalization"])
        }
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call_metadata(self, request: Any) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the client's own, and the routing header of a call about a layer, by
        which a proxy in front of layer-sharded replicas picks the layer's replica (normserve.v1.routing)."""
        layer = routing.layer_of(request)
        if layer is None:
            return self._metadata
        if not routing.NAME_PATTERN.fullmatch(layer):  # refused here: gRPC would fail it as a bad header
            problem = (
                f"layer name {layer[:80]!r} (length {len(layer)}) is not a valid layer name: use 1 to 256 "
                "characters from A-Z a-z 0-9 _ . : / -"
            )
            field = "layer" if "layer" in request.DESCRIPTOR.fields_by_name else "name"
            # The details the server would give, so that code branching on them sees no difference.
            raise InvalidArgument(problem, reason="INVALID_REQUEST", field_violations=((field, problem),))
        return (*self._metadata, (routing.LAYER_HEADER, layer))

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _rpc(self, method: str) -> Any:
        """The callable for ``method`` (a Normalization method, or ``Health/Check``)."""
        if method.startswith("Health/"):
            return getattr(self._health, method.removeprefix("Health/"))
        return self._calls[method]

    def _streams(self, method: str, request: Any) -> bool:
        """Whether ``request`` goes through the method's streaming form (by its tensors' size)."""
        if method not in STREAMABLE_METHODS or not isinstance(request, wire.Payload):
            return False
        return sum(wire.nbytes(data) for data in request.data.values()) >= self.stream_threshold

    def _stream_parts(self, request: wire.Payload) -> Any:
        return wire.split(request, self.chunk_bytes)

    @property
    def regions(self) -> list[SharedMemoryRegion]:
        """The shared-memory regions this client created and registered."""
        return list(self._regions.values())

    def _new_region(self, name: str, byte_size: int, release: Callable[[], Any]) -> SharedMemoryRegion:
        if name in self._regions:
            raise InvalidArgument(
                f"this client already has a region named {name!r}; unregister it or pick another name"
            )
        return SharedMemoryRegion(name, byte_size, release)

    def _forget_regions(self, regions: Sequence[pb.SharedMemoryRegion]) -> None:
        for region in regions:
            local = self._regions.pop(region.name, None)
            if local is not None:
                local.close()


# ---------------------------------------------------------------------- answers, checked against the request
@contextlib.contextmanager
def reading_answer(method: str) -> Iterator[None]:
    """Decoding the answer to ``method``: whatever does not decode is a MalformedAnswer (a NormServeError)."""
    try:
        yield
    except MalformedAnswer:
        raise
    except (ValueError, DecodeError, MemoryError, OverflowError) as exc:  # codec.TensorError, wire.WireError, ...
        raise MalformedAnswer(f"the server's answer does not decode: {exc}", method=method) from None


def expected_outputs(request: Any) -> dict[str, tuple[tuple[int, ...], int | None]]:
    """The output tensor of a Train, Infer or Gradient request: {field: (shape, wire dtype or None for any)}.

    y is shaped like x, dx like dy (which is shaped like x, kept or sent); they come in the request's
    output_dtype, else in x's wire dtype (a kept forward's is not known here).
    """
    message = getattr(request, "message", request)
    if isinstance(message, (pb.TrainRequest, pb.InferRequest)):
        return {"y": (tuple(message.x.shape), message.output_dtype or message.x.dtype)}
    if isinstance(message, pb.GradientRequest):
        dtype = message.output_dtype or (message.x.dtype if message.HasField("x") else None)
        return {"dx": (tuple(message.dy.shape), dtype)}
    return {}


def _checked_output(tensor: pb.Tensor, field: str, expected: tuple[tuple[int, ...], int | None], method: str) -> int:
    """The byte length of an answer's output tensor, after checking it is the one the request asked for."""
    shape, dtype = expected
    with reading_answer(method):
        nbytes = codec.check(tensor, field)[2]
    if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype):
        raise MalformedAnswer(
            f"the server answered {field} of shape {list(tensor.shape)[:8]} in {_dtype_name(tensor.dtype)}, but the "
            f"request asks for shape {list(shape)[:8]} in {_dtype_name(dtype)}",
            method=method,
        )
    return nbytes


def _dtype_name(dtype: int | None) -> str:
    return "any dtype" if dtype is None else pb.DType.Name(dtype) if dtype in pb.DType.values() else f"dtype {dtype}"


def check_answer(method: str, request: Any, response: Any) -> None:
    """Refuse (MalformedAnswer) an answer whose output is not the one ``request`` asked for: shape, dtype,
    size of its elements, or a shared-memory place the request did not give."""
    for field, expected in expected_outputs(request).items():
        if not response.HasField(field):
            raise MalformedAnswer(f"the server's answer has no {field}", method=method)
        tensor = getattr(response, field)
        nbytes = _checked_output(tensor, field, expected, method)
        if tensor.HasField("shared_memory"):
            message = getattr(request, "message", request)
            given = message.output_shared_memory if message.HasField("output_shared_memory") else None
            place = tensor.shared_memory
            if given is None or (place.region, place.offset, place.byte_size) != (given.region, given.offset, nbytes):
                raise MalformedAnswer(
                    f"the server answered {field} in shared memory the request did not give it", method=method
                )


class AnswerAssembly:
    """Gathers a streamed answer (the server's head and chunks), its head checked against the request
    before any buffer is allocated: only the request's output may stream, at the size it asked for."""

    def __init__(self, request: Any) -> None:
        self._method = method = type(getattr(request, "message", request)).__name__.removesuffix("Request") + "Stream"
        expected = expected_outputs(request)

        def size_of(tensor: pb.Tensor, field: str) -> int:
            if field not in expected:  # the other tensors (dweight, dbias) come whole in the head
                raise MalformedAnswer(f"the server streams {field}, which it sends in the head", method=method)
            return _checked_output(tensor, field, expected[field], method)

        self._assembly = wire.Assembly(size_of)

    def take(self, part: Any) -> None:
        with reading_answer(self._method):
            self._assembly.take(part)

    def result(self) -> wire.Payload:
        with reading_answer(self._method):
            return self._assembly.result()


class SharedMemoryRegion:
    """A POSIX shared-memory object this client created, registered with the server under ``name``.

    Arrays made by :meth:`array` live in it: passed as inputs, or as ``out=``
    for results, they travel by reference (region, offset, size), not over
    the socket. Only for a server on the same host started with
    ``--shared-memory``. Close it through the client
    (``unregister_shared_memory``), or use it as a context manager.
    """

    def __init__(self, name: str, byte_size: int, release: Callable[[], Any]) -> None:
        self.name = name
        self.byte_size = byte_size
        self._memory = shared_memory.SharedMemory(create=True, size=byte_size)
        #: The object's POSIX name (what the server opens).
        self.key = self._memory.name
        probe = np.frombuffer(self._memory.buf, np.uint8)
        self._address = probe.__array_interface__["data"][0]
        del probe  # a live view would keep the mapping from closing
        self._next = 0
        self._release = release

    def __repr__(self) -> str:
        return f"SharedMemoryRegion({self.name!r}, key={self.key!r}, byte_size={self.byte_size})"

    def array(self, shape: int | Sequence[int], dtype: Any = np.float32, *, offset: int | None = None) -> np.ndarray:
        """A C-contiguous array in the region, at ``offset`` or after the arrays made so far (64-byte aligned)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        dtype = codec.as_dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if offset is None:
            offset = -(-self._next // 64) * 64
        if offset < 0 or offset + nbytes > self.byte_size:
            raise InvalidArgument(
                f"an array of {nbytes} bytes at offset {offset} does not fit region {self.name!r} "
                f"({self.byte_size} bytes); create a larger region"
            )
        self._next = max(self._next, offset + nbytes)
        return np.ndarray(shape, dtype, buffer=self._memory.buf, offset=offset)

    def reference(self, array: np.ndarray) -> pb.SharedMemoryRef | None:
        """Where ``array`` lies in this region, or None when it does not (or is not C-contiguous)."""
        start = array.__array_interface__["data"][0] - self._address
        if not array.flags.c_contiguous or start < 0 or start + array.nbytes > self.byte_size:
            return None
        return pb.SharedMemoryRef(region=self.name, offset=start, byte_size=array.nbytes)

    def close(self) -> None:
        """Unmap and unlink the object here (the client's unregister calls this)."""
        with contextlib.suppress(BufferError):  # arrays from array() still alive: unmapped with the last one
            self._memory.close()
        self._memory.unlink()

    def __enter__(self) -> SharedMemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    async def __aenter__(self) -> SharedMemoryRegion:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._release()


class LayerHandle:
    """What a remote layer handle knows without a call: its last description and defaults."""

    def __init__(self, client: Any, info: pb.Layer) -> None:
        self._client = client
        #: The layer's description from the last call that returned one.
        self.info = info
        #: The forward_id of the last Train called with ``keep_forward=True`` (None before one).
        self.forward_id: str | None = None
        #: running_mean and running_var after the last Train called with ``return_running_stats=True``.
        self.running_stats: dict[str, np.ndarray] = {}

    name = property(lambda self: self.info.name)
    kind = property(lambda self: _kind_name(self.info.config.kind))
    version = property(lambda self: self.info.version)
    #: The layer's config as PyTorch's keyword arguments (and ``kind``, ``dtype``, ``device``).
    config = property(lambda self: config_arguments(self.info.config))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, kind={self.kind!r}, version={self.version})"

    def _forward_request(self, method: str, x: Any, wire_dtype: Any, out: Any, keep_forward: bool = False) -> Request:
        wire_dtype = self._client.wire_dtype if wire_dtype is None else wire_dtype
        return forward_request(method, self.name, x, wire_dtype, self._client.regions, out, keep_forward)

    def _train_request(
        self,
        x: Any,
        wire_dtype: Any,
        out: Any,
        keep_forward: bool,
        sync: SyncGroup | None,
        parameters: Mapping[str, Any] | None,
        return_running_stats: bool,
    ) -> Request:
        request = self._forward_request("Train", x, wire_dtype, out, keep_forward)
        train_options(request.message.message, sync, parameters, return_running_stats)
        return request

    def _gradient_request(
        self,
        x: Any,
        dy: Any,
        training: bool,
        wire_dtype: Any,
        forward_id: str | None,
        out: Any,
        sync: SyncGroup | None = None,
    ) -> Request:
        wire_dtype = self._client.wire_dtype if wire_dtype is None else wire_dtype
        if x is None:
            forward_id = forward_id or self.forward_id
            if forward_id is None:
                raise InvalidArgument(
                    "gradient(None, dy) needs a kept forward: call train(x, keep_forward=True) first, "
                    "or pass x or forward_id"
                )
        request = gradient_request(self.name, x, dy, training, wire_dtype, self._client.regions, forward_id, out)
        if sync is not None:
            request.message.sync.CopyFrom(sync.message())
        return request

    def _forward_result(self, response: wire.Payload, request: Request) -> np.ndarray:
        """y from a Train/Infer response; ``info`` (and ``running_stats``) learn what it reports."""
        self.info.version = response.version
        if isinstance(response.message, pb.TrainResponse):
            self.info.num_batches_tracked = response.num_batches_tracked
            if response.forward_id:
                self.forward_id = response.forward_id
            if response.running_stats:
                self.running_stats = running_stats(response.running_stats, self.info)
        return output_array(response, "y", request)


def _kind_name(kind: int) -> str:
    return pb.Kind.Name(kind).lower() if kind in pb.Kind.values() else f"unknown kind {kind}"


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
            return tensor.view(torch.int16).numpy().view(codec.as_dtype("bfloat16"))
        return tensor.numpy()
    if module == "cupy":
        return x.get()
    return np.asarray(x)


@_checks_arguments
def _wire_enum(wire_dtype: Any) -> int:
    return pb.DTYPE_UNSPECIFIED if wire_dtype is None else codec.dtype_enum(wire_dtype)


@_checks_arguments
def input_tensor(x: Any, wire_dtype: Any, regions: Sequence[SharedMemoryRegion]) -> tuple[pb.Tensor, Any, np.dtype]:
    """(Tensor header, its elements or None when they are in a shared-memory region, the caller's dtype).

    An array in one of ``regions`` goes by reference when it travels in its
    own dtype; otherwise its elements (cast to ``wire_dtype``) go in the message.
    """
    array = as_numpy(x)
    enum = _wire_enum(wire_dtype)
    ref = _reference(array, regions) if enum in (pb.DTYPE_UNSPECIFIED, _own_enum(array)) else None
    if ref is not None:
        return pb.Tensor(dtype=codec.dtype_enum(array.dtype), shape=array.shape, shared_memory=ref), None, array.dtype
    header, data = codec.outgoing(array, enum)
    return header, data, array.dtype


def _own_enum(array: np.ndarray) -> int | None:
    try:
        return codec.dtype_enum(array.dtype)
    except codec.TensorError:
        return None


def _reference(array: np.ndarray, regions: Sequence[SharedMemoryRegion]) -> pb.SharedMemoryRef | None:
    """Where ``array`` lies in one of ``regions``, or None."""
    return next((ref for region in regions if (ref := region.reference(array)) is not None), None)


def _output_place(out: Any, regions: Sequence[SharedMemoryRegion]) -> pb.SharedMemoryRef:
    ref = _reference(out, regions) if isinstance(out, np.ndarray) else None
    if ref is not None:
        return ref
    raise InvalidArgument(
        "out must be an array in a shared-memory region of this client (client.create_shared_memory(...).array(...))"
    )


@dataclass
class Request:
    """A request ready to send, and how to read its answer."""

    message: wire.Payload
    dtype: np.dtype  # results come back in it (the input's dtype)
    out: np.ndarray | None  # the caller's shared-memory array the server writes the result into


@_checks_arguments
def _request(
    message: Any, tensors: dict[str, tuple[pb.Tensor, Any]], dtype: np.dtype, out: Any, regions: Any
) -> Request:
    data = {}
    for field, (header, elements) in tensors.items():
        getattr(message, field).CopyFrom(header)
        if elements is not None:
            data[field] = elements
    if out is not None:
        message.output_shared_memory.CopyFrom(_output_place(out, regions))
        message.output_dtype = codec.dtype_enum(out.dtype)
    return Request(wire.Payload(message, data), dtype, out)


def output_array(response: wire.Payload, field: str, request: Request) -> np.ndarray:
    """A result in the caller's dtype (the wire dtype is a transport detail): a writable copy,
    or the caller's ``out`` array the server wrote it into."""
    if getattr(response, field).HasField("shared_memory"):
        return request.out  # where the request asked for it (check_answer)
    return _received(response, field).astype(request.dtype)


def _received(response: wire.Payload, field: str) -> np.ndarray:
    """A response tensor as a read-only view of the received bytes."""
    with reading_answer(type(response.message).__name__):
        return codec.decode(getattr(response, field), field, data=response.data.get(field))


def parameter_like(tensor: pb.Tensor, what: str, layer: pb.Layer) -> np.ndarray:
    """A parameter-shaped tensor of an answer (dweight, a state tensor, a running statistic) as a copy,
    checked to have the layer's param_shape and param dtype."""
    dtype = layer.config.param_dtype or pb.FLOAT32
    if tuple(tensor.shape) != tuple(layer.param_shape) or tensor.dtype != dtype:
        raise MalformedAnswer(
            f"the server answered {what} of shape {list(tensor.shape)[:8]} in {_dtype_name(tensor.dtype)}; layer "
            f"{layer.name[:80]!r}'s parameters have shape {list(layer.param_shape)[:8]} in {_dtype_name(dtype)}"
        )
    with reading_answer(what):
        return codec.decode(tensor, what).copy()


# ---------------------------------------------------------------------- requests and results
def next_page(token: str, response: pb.ListLayersResponse) -> str:
    """The ListLayers page token to ask with next after asking with ``token`` ("" when the list is done).

    A server's tokens grow from page to page and come with at least one layer: one that would have the
    client page forever is a MalformedAnswer.
    """
    following = response.next_page_token
    if following and (following <= token or not response.layers):
        raise MalformedAnswer(
            f"the server answered page_token {token[:64]!r} with next_page_token {following[:64]!r} and "
            f"{len(response.layers)} layer(s): its pages would never end",
            method="ListLayers",
        )
    return following


@dataclass(frozen=True)
class LayerInfo:
    """A layer's description as Python values (``RemoteLayer.refresh()``; the message itself is ``.info``)."""

    name: str
    kind: str
    #: PyTorch's constructor arguments, every default resolved, plus ``dtype`` and ``device`` (``layer.config``).
    config: dict[str, Any]
    version: int
    num_batches_tracked: int
    param_shape: tuple[int, ...]
    state_keys: tuple[str, ...]
    #: Why the server could not restore the layer's stored state ("" for a layer that serves).
    restore_error: str
    #: How the training batches look to the layer (the LayerStats message: docs/service.md, Monitoring).
    stats: pb.LayerStats


def layer_info(layer: pb.Layer) -> LayerInfo:
    config = config_arguments(layer.config)
    return LayerInfo(
        layer.name,
        config["kind"],
        config,
        layer.version,
        layer.num_batches_tracked,
        tuple(layer.param_shape),
        tuple(layer.state_keys),
        layer.restore_error,
        layer.stats,
    )


def config_arguments(config: pb.LayerConfig) -> dict[str, Any]:
    """A LayerConfig as the keyword arguments :func:`layer_config` takes (its inverse), and ``kind``."""
    kind = pb.Kind.Name(config.kind).lower() if config.kind in pb.Kind.values() else str(config.kind)
    arguments: dict[str, Any] = {"kind": kind}
    known = kinds.config_fields(kind) if kind in kinds.kind_names() else {}  # a newer server's kind: its name only
    for field, arg in known.items():
        if field == "normalized_shape":
            arguments[arg] = tuple(config.normalized_shape)
        elif field == "momentum" and config.cumulative_average:
            arguments[arg] = None
        elif config.DESCRIPTOR.fields_by_name[field].has_presence and not config.HasField(field):
            arguments[arg] = None  # e.g. RMSNorm's eps=None: the compute dtype's epsilon
        else:
            arguments[arg] = getattr(config, field)
    arguments["dtype"] = "float64" if config.param_dtype == pb.FLOAT64 else "float32"
    arguments["device"] = config.device
    return arguments


def health_status(response: health_pb2.HealthCheckResponse) -> str:
    """``"SERVING"``, ``"NOT_SERVING"``, ... from a health check answer."""
    with reading_answer("Health/Check"):  # a status this client does not know is not one it can act on
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


@_checks_arguments
def layer_config(kind: str, **kwargs: Any) -> pb.LayerConfig:
    """A LayerConfig from PyTorch-style arguments: ``layer_config("group_norm", num_groups=4, num_channels=32)``."""
    try:
        return kinds.layer_config(kind, **kwargs)
    except TypeError as exc:
        raise UnknownArgument(str(exc)) from None
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


_FORWARD_REQUESTS = {"Train": pb.TrainRequest, "Infer": pb.InferRequest}


def forward_request(
    method: str,
    name: str,
    x: Any,
    wire_dtype: Any,
    regions: Sequence[SharedMemoryRegion] = (),
    out: Any = None,
    keep_forward: bool = False,
) -> Request:
    """A Train or Infer request."""
    header, data, dtype = input_tensor(x, wire_dtype, regions)
    message = _FORWARD_REQUESTS[method](layer=name, output_dtype=_wire_enum(wire_dtype))
    if keep_forward:
        message.keep_forward = True
    return _request(message, {"x": (header, data)}, dtype, out, regions)


@_checks_arguments
def train_options(
    message: Any,
    sync: SyncGroup | None = None,
    parameters: Mapping[str, Any] | None = None,
    return_running_stats: bool = False,
) -> None:
    """Set a TrainRequest's options: a synchronized step, new weight/bias, running statistics in the answer."""
    if sync is not None:
        message.sync.CopyFrom(sync.message())
    for key, value in (parameters or {}).items():
        message.parameters[key].CopyFrom(codec.encode(as_numpy(value)))
    if return_running_stats:
        message.return_running_stats = True


class TrainedStatistics(NamedTuple):
    """A TrainStatistics answer: the statistics to normalize the batch with (per group, float64: the
    request's own, or the synchronized step's), and the layer's running statistics and version after it."""

    count: int
    mean: np.ndarray
    var: np.ndarray  # biased
    running_mean: np.ndarray | None  # None: the layer keeps no running statistics (a synchronized batch norm)
    running_var: np.ndarray | None
    num_batches_tracked: int
    version: int


class StepSums(NamedTuple):
    """A synchronized backward's sums over all ranks (GradientStatistics): per channel, float64."""

    count: int
    sum_dy: np.ndarray
    sum_dy_xmu: np.ndarray


def _float64(values: Any, what: str) -> np.ndarray:
    array = as_numpy(values).astype(np.float64, copy=False).reshape(-1)
    if not array.size:
        raise InvalidArgument(f"{what} is empty: give one value per group")
    return array


def train_statistics_request(
    name: str,
    count: int,
    mean: Any,
    m2: Any,
    sync: SyncGroup | None,
    parameters: Mapping[str, Any] | None,
) -> pb.TrainStatisticsRequest:
    """A TrainStatistics request: ``count`` values behind each group's ``mean`` and ``m2`` (any array type)."""
    statistics = pb.BatchStatistics(count=int(count), mean=_float64(mean, "mean"), m2=_float64(m2, "m2"))
    request = pb.TrainStatisticsRequest(layer=name, statistics=statistics)
    train_options(request, sync, parameters)
    return request


def statistics_update(
    name: str, step: int, count: int, mean: Any, m2: Any, parameters: Mapping[str, Any] | None
) -> pb.StatisticsUpdate:
    """One update of a PushStatistics message: as :func:`train_statistics_request`, numbered ``step``."""
    update = pb.StatisticsUpdate(
        layer=name,
        step=step,
        count=int(count),
        mean=codec.encode(_float64(mean, "mean")),
        m2=codec.encode(_float64(m2, "m2")),
    )
    train_options(update, None, parameters)
    return update


def running_stats(tensors: Mapping[str, pb.Tensor], layer: pb.Layer) -> dict[str, np.ndarray]:
    """An answer's running_mean and running_var, checked against the layer."""
    unknown = set(tensors) - {"running_mean", "running_var"}
    if unknown:
        raise MalformedAnswer(f"the server answered running statistics {sorted(unknown)[:4]} the layer has not")
    return {key: parameter_like(tensor, key, layer) for key, tensor in tensors.items()}


def trained_statistics(response: pb.TrainStatisticsResponse, layer: pb.Layer) -> TrainedStatistics:
    statistics = response.statistics
    mean, m2 = np.array(statistics.mean, dtype=np.float64), np.array(statistics.m2, dtype=np.float64)
    if statistics.count < 1 or mean.shape != m2.shape:
        raise MalformedAnswer(
            f"the server answered statistics of count {statistics.count} with {mean.size} means and {m2.size} m2",
            method="TrainStatistics",
        )
    running = running_stats(response.running_stats, layer)
    return TrainedStatistics(
        statistics.count,
        mean,
        m2 / statistics.count,
        running.get("running_mean"),
        running.get("running_var"),
        response.num_batches_tracked,
        response.version,
    )


def gradient_statistics_request(
    name: str, count: int, sum_dy: Any, sum_dy_xmu: Any, sync: SyncGroup
) -> pb.GradientStatisticsRequest:
    return pb.GradientStatisticsRequest(
        layer=name,
        count=int(count),
        sum_dy=_float64(sum_dy, "sum_dy"),
        sum_dy_xmu=_float64(sum_dy_xmu, "sum_dy_xmu"),
        sync=sync.message(),
    )


def step_sums(response: pb.GradientStatisticsResponse) -> StepSums:
    return StepSums(
        response.count, np.array(response.sum_dy, dtype=np.float64), np.array(response.sum_dy_xmu, dtype=np.float64)
    )


def gradient_request(
    name: str,
    x: Any,
    dy: Any,
    training: bool,
    wire_dtype: Any,
    regions: Sequence[SharedMemoryRegion] = (),
    forward_id: str | None = None,
    out: Any = None,
) -> Request:
    """A Gradient request for ``x``, or (``x`` None) for the kept forward ``forward_id``."""
    dy_header, dy_data, dy_dtype = input_tensor(dy, wire_dtype, regions)
    message = pb.GradientRequest(layer=name, training=training, output_dtype=_wire_enum(wire_dtype))
    tensors = {"dy": (dy_header, dy_data)}
    dtype = dy_dtype
    if x is None:
        message.forward_id = forward_id
    else:
        x_header, x_data, dtype = input_tensor(x, wire_dtype, regions)
        tensors = {"x": (x_header, x_data), **tensors}
    return _request(message, tensors, dtype, out, regions)


def gradient_result(
    response: wire.Payload, request: Request, layer: pb.Layer
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(dx in the input's dtype, dweight, dbias in the layer's param dtype or None)."""
    dx = output_array(response, "dx", request)
    dweight, dbias = (
        _parameter_answer(response, field, layer) if response.HasField(field) else None
        for field in ("dweight", "dbias")
    )
    return dx, dweight, dbias


def _parameter_answer(response: wire.Payload, field: str, layer: pb.Layer) -> np.ndarray:
    if field in response.data:  # another writer's answer may keep these elements outside the head too
        tensor = pb.Tensor()
        tensor.CopyFrom(getattr(response, field))
        tensor.data = bytes(response.data[field])
        return parameter_like(tensor, field, layer)
    return parameter_like(getattr(response, field), field, layer)


def state_dict(state: pb.LayerState, layer: pb.Layer) -> dict[str, np.ndarray]:
    """PyTorch-style state dict: float tensors plus ``num_batches_tracked`` as an int64 scalar."""
    keys = sorted(state.tensors, key=lambda k: _STATE_ORDER.index(k) if k in _STATE_ORDER else len(_STATE_ORDER))
    result = {key: parameter_like(state.tensors[key], key, layer) for key in keys}
    if state.HasField("num_batches_tracked"):
        result["num_batches_tracked"] = np.array(state.num_batches_tracked, dtype=np.int64)
    return result


@_checks_arguments
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
