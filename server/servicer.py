"""The Normalization servicer: wire messages in, registry calls, wire messages out.

Each method validates and decodes its request, calls the registry, and
encodes the answer. Errors become status codes in one place
(:func:`_translate_errors`). Tensors arrive and leave through
:mod:`normserve.v1.wire` (views, not copies), whole in one message, in a
stream's chunks (the ``*Stream`` methods share the unary implementations),
or in shared memory.

Everything a request could get wrong is refused before any state changes:
an answer that would not fit in one message is refused before the work
(streams cut theirs into chunks that fit), a stream's head is checked
before its chunks are taken, and a synchronized rank refused for a bad
request fails its step for the other ranks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from normkernels import NormError, NormLayer
from normkernels.core import GradSums, Moments
from normserve.server import layer_pages
from normserve.server.errors import (
    AnswerTooLarge,
    InvalidRequest,
    ServiceError,
    reason_for,
    status_details,
    status_for,
)
from normserve.server.layer_config import check_name, describe_config
from normserve.server.logs import shorten
from normserve.server.registry import (
    GRADIENT_PHASE,
    GRADIENT_STATISTICS_PHASE,
    RUNNING_KEYS,
    TRAINING_PHASE,
    Registry,
    Snapshot,
    StatisticsUpdate,
    TrainingStats,
    Unrestorable,
    host_state,
)
from normserve.server.shared_memory import SharedMemoryRegions
from normserve.server.sync_groups import SyncSpec
from normserve.v1 import codec, wire
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc
from normserve.v1.codec import TensorError

__all__ = ["SERVICE_NAME", "STREAM_CHUNK_BYTES", "Limits", "NormalizationServicer", "describe_layer"]

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Response = TypeVar("Response")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Normalization"].full_name
#: Size of the TensorChunks of streamed answers (smaller when --max-message-bytes is).
STREAM_CHUNK_BYTES = 1 << 20
#: Bytes of an answer besides its tensors' elements (fields, headers, ids), allowed for when sizing it.
ANSWER_OVERHEAD_BYTES = 4 << 10
#: Characters of an error's message sent to the client: twice, as grpc-message and in the google.rpc.Status
#: beside it, well inside gRPC's 8 KiB default metadata limit.
DETAILS_CHARACTERS = 2048
#: Updates one PushStatistics message may hold (a step of a very deep model, or many steps of a small one).
MAX_UPDATES_PER_MESSAGE = 4096
#: States up to this many bytes are encoded on the event loop.
INLINE_STATE_BYTES = 1 << 20
_HALF_DTYPES = (pb.FLOAT16, pb.BFLOAT16)
#: The half of a synchronized step each request type joins.
_PHASES = {
    pb.TrainRequest.DESCRIPTOR.name: TRAINING_PHASE,
    pb.TrainStatisticsRequest.DESCRIPTOR.name: TRAINING_PHASE,
    pb.GradientRequest.DESCRIPTOR.name: GRADIENT_PHASE,
    pb.GradientStatisticsRequest.DESCRIPTOR.name: GRADIENT_STATISTICS_PHASE,
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask: larger tensors answer RESOURCE_EXHAUSTED; a call
    without a deadline waits at most ``default_deadline`` seconds to start (and a
    stream at most that long on a silent peer); no message either way is larger
    than ``max_message_bytes``."""

    max_tensor_bytes: int = 1 << 30
    max_tensor_elements: int = 1 << 28
    default_deadline: float = 60.0
    max_message_bytes: int = (1 << 31) - 1  # gRPC's own ceiling

    @property
    def chunk_bytes(self) -> int:
        """Bytes per TensorChunk of a streamed answer: a chunk message fits max_message_bytes."""
        return max(1, min(STREAM_CHUNK_BYTES, self.max_message_bytes - 64))


def _translate_errors(name: str) -> Callable[[grpc.aio.ServicerContext, BaseException], Awaitable[None]]:
    async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc  # the call was ended already (a stalled stream): its status is sent
        code = status_for(exc)
        if code is None:
            log.error("%s failed", name, exc_info=exc)
            message = f"{name} failed inside the server ({type(exc).__name__}); the server log has the details"
            await context.abort(
                grpc.StatusCode.INTERNAL, message, status_details(grpc.StatusCode.INTERNAL, message, "INTERNAL")
            )
        message = shorten(str(exc), DETAILS_CHARACTERS)  # quoted client text stays bounded
        field = getattr(exc, "field", "")
        await context.abort(
            code, message, status_details(code, message, reason_for(exc), [(field, message)] if field else ())
        )

    return abort


@contextlib.contextmanager
def _about(field: str) -> Iterator[None]:
    """An INVALID_ARGUMENT inside that names no request field names ``field`` (its BadRequest field violation)."""
    try:
        yield
    except (TensorError, NormError, ServiceError) as exc:
        if status_for(exc) == grpc.StatusCode.INVALID_ARGUMENT and not getattr(exc, "field", ""):
            exc.field = field
        raise


def _rpc(
    method: Callable[[Any, Request, Any], Awaitable[Response]],
) -> Callable[[Any, Request, Any], Awaitable[Response]]:
    """A unary method whose domain errors become status codes with their messages (anything else: INTERNAL)."""
    abort = _translate_errors(method.__name__.strip("_"))

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except Exception as exc:
            await abort(context, exc)
            raise

    return handler


def _streaming(
    method: Callable[..., Awaitable[wire.Payload]],
) -> Callable[..., AsyncIterator[Any]]:
    """The streaming form of a unary method: gather the request's parts, run it, send the answer in parts."""
    abort = _translate_errors(method.__name__.strip("_") + "Stream")

    async def handler(self: Any, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            response = await method(self, await self._gather(requests), context, streamed=True)
        except Exception as exc:
            await abort(context, exc)
            raise
        for part in wire.split(response, self._limits.chunk_bytes):
            yield part

    return handler


def _rpc_stream(
    method: Callable[[Any, AsyncIterator[Request], Any], AsyncIterator[Response]],
) -> Callable[[Any, AsyncIterator[Request], Any], AsyncIterator[Response]]:
    """A streaming method whose domain errors end the stream with their status codes (as :func:`_rpc`)."""
    abort = _translate_errors(method.__name__)

    @functools.wraps(method)
    async def handler(self: Any, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in method(self, requests, context):
                yield response
        except Exception as exc:
            await abort(context, exc)
            raise

    return handler


def _state_bytes(layer: Any, keys: tuple[str, ...]) -> int:
    """Bytes of those of the layer's state tensors ``keys`` names that it has."""
    return layer.tensor_nbytes * sum(key in layer.state_keys for key in keys)


def _running_stats(response: Any, snapshot: Snapshot) -> None:
    """The layer's running statistics after a training batch, into ``response.running_stats``."""
    if snapshot.layer.track_running_stats:
        for key, value in host_state(snapshot.layer, RUNNING_KEYS).items():
            response.running_stats[key].CopyFrom(codec.encode(value))


def _sums(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        raise InvalidRequest(f"{what} contains NaN or Inf", field=what)
    return array


#: Values one rank's statistics may stand for (2**40: terabytes of batch): exact as float64, and a step's sum
#: over up to 2**20 ranks (--max-world-size's ceiling) still fits the answer's uint64.
MAX_STATISTICS_COUNT = 2**40


def _count(count: int, what: str) -> int:
    if not 1 <= count <= MAX_STATISTICS_COUNT:
        raise InvalidRequest(
            f"{what} (the values behind each statistic) must be in [1, 2**40], got {count}", field=what
        )
    return count


def batch_statistics(message: pb.BatchStatistics) -> GradSums:
    """A BatchStatistics message as a step's part (moments: mean and biased variance per group); the layer
    checks the groups against itself (``check_statistics``) before anything changes."""
    return statistics_part(message.count, message.mean, message.m2, "statistics")


def statistics_part(count: int, mean: Any, m2: Any, where: str) -> GradSums:
    """``count`` values behind each group's ``mean`` and ``m2`` (float64 arrays or sequences) as a part."""
    count = _count(count, f"{where}.count")
    mean, m2 = (np.asarray(values, dtype=np.float64) for values in (mean, m2))
    return GradSums(count, Moments(mean, m2 / count), None, None)


def describe_outcome(outcome: Snapshot | Exception) -> pb.StatisticsOutcome:
    """What became of one update of a PushStatistics message, as its answer says it."""
    if isinstance(outcome, Snapshot):
        running = {key: codec.encode(value) for key, value in host_state(outcome.layer, RUNNING_KEYS).items()}
        return pb.StatisticsOutcome(
            version=outcome.version, num_batches_tracked=outcome.layer.num_batches_tracked, **running
        )
    code = status_for(outcome)
    if code is None:
        log.error("PushStatistics: an update failed", exc_info=outcome)
        code, text = grpc.StatusCode.INTERNAL, f"the update failed inside the server ({type(outcome).__name__})"
    else:
        text = shorten(str(outcome), DETAILS_CHARACTERS)
    return pb.StatisticsOutcome(code=code.value[0], message=text, reason=reason_for(outcome))


def describe_statistics(total: GradSums) -> pb.BatchStatistics:
    mean, var = (np.asarray(a, dtype=np.float64).reshape(-1) for a in total.moments)
    return pb.BatchStatistics(count=total.count, mean=mean, m2=var * total.count)


def describe_stats(stats: TrainingStats) -> pb.LayerStats:
    message = pb.LayerStats(train_calls=stats.train_calls)
    if stats.last is not None:
        for field, value in stats.last._asdict().items():
            if value is not None:
                setattr(message, field, value)
    return message


def describe_layer(snapshot: Snapshot | Unrestorable) -> pb.Layer:
    if isinstance(snapshot, Unrestorable):
        return pb.Layer(
            name=snapshot.name,
            config=snapshot.config,
            version=snapshot.version,
            num_batches_tracked=snapshot.num_batches_tracked,
            restore_error=snapshot.error,
            oldest_version=snapshot.version,
        )
    layer = snapshot.layer
    return pb.Layer(
        name=snapshot.name,
        config=describe_config(layer),
        version=snapshot.version,
        num_batches_tracked=layer.num_batches_tracked,
        param_shape=layer.param_shape,
        state_keys=layer.state_keys,
        stats=describe_stats(snapshot.stats),
        oldest_version=snapshot.oldest_kept,
    )


class NormalizationServicer(pb_grpc.NormalizationServicer):
    def __init__(self, registry: Registry, limits: Limits, shared_memory: SharedMemoryRegions | None = None) -> None:
        self._registry = registry
        self._limits = limits
        self._shared_memory = shared_memory or SharedMemoryRegions(enabled=False)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """This servicer's methods with the zero-copy codecs of :mod:`normserve.v1.wire`."""
        handlers = {}
        for method in wire.methods(pb.DESCRIPTOR.services_by_name["Normalization"]):
            make = grpc.stream_stream_rpc_method_handler if method.streaming else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(
                getattr(self, method.name),
                request_deserializer=wire.parser(method.request_type),
                response_serializer=wire.serializer(method.response_type),
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    # ------------------------------------------------------------------ decoding helpers
    def _wait(self, context: grpc.aio.ServicerContext) -> float:
        """How long this call may wait to start: its own deadline, else the server's default."""
        remaining = context.time_remaining()
        return self._limits.default_deadline if remaining is None else remaining

    def _check(self, tensor: pb.Tensor, what: str) -> int:
        """The byte length ``tensor`` describes, within the limits."""
        return codec.check(
            tensor, what, max_elements=self._limits.max_tensor_elements, max_bytes=self._limits.max_tensor_bytes
        )[2]

    async def _tensor(self, tensor: pb.Tensor, what: str, data: Any = None) -> np.ndarray:
        """A request tensor as an array to compute on: a view of the request, or a copy of shared memory.

        float16 and bfloat16 are wire formats only: the kernels compute them in float32.
        """
        with _about(what):
            return await self._decoded(tensor, what, data)

    async def _decoded(self, tensor: pb.Tensor, what: str, data: Any) -> np.ndarray:
        where = "data"
        if tensor.WhichOneof("contents") == "shared_memory":
            expected = self._check(tensor, what)  # limits first: a reference may name any size ...
            ref = tensor.shared_memory
            if ref.byte_size != expected:  # ... and only the checked size is read
                raise InvalidRequest(
                    f"{what}.shared_memory has {ref.byte_size} bytes but shape {list(tensor.shape)[:8]} of "
                    f"{pb.DType.Name(tensor.dtype)} needs {expected} bytes"
                )
            data = await self._shared_memory.read(ref, f"{what}.shared_memory")
            where = "shared_memory"
        array = codec.decode(
            tensor,
            what,
            data=data,
            where=where,
            max_elements=self._limits.max_tensor_elements,
            max_bytes=self._limits.max_tensor_bytes,
        )
        return array.astype(np.float32) if tensor.dtype in _HALF_DTYPES else array

    async def _input(self, request: wire.Payload, field: str, meaning: str) -> np.ndarray:
        if not request.HasField(field):
            raise InvalidRequest(f"{field} is required: {meaning}", field=field)
        return await self._tensor(getattr(request, field), field, request.data.get(field))

    async def _state_tensors(
        self, tensors: Any, layer: Any, keys: tuple[str, ...], what: str, meaning: str
    ) -> dict[str, np.ndarray]:
        """A request's tensors of ``layer``'s state (``keys`` allowed, which are ``meaning``): their names and
        sizes are checked before any of them is read, so a request cannot make the server read what it will
        refuse."""
        unknown = sorted(set(tensors) - set(keys))
        if unknown:
            raise InvalidRequest(
                f"{what}: unknown state key(s) {shorten(repr(unknown), 256)}; it may hold {meaning} only: {list(keys)}"
            )
        elements = math.prod(layer.param_shape)
        for key, tensor in tensors.items():
            if math.prod(tensor.shape) != elements:
                shape = shorten(str(tuple(tensor.shape)), 256)
                raise InvalidRequest(
                    f"{what}[{key!r}] has shape {shape}, the layer needs {layer.param_shape}", field=f"{what}[{key!r}]"
                )
        return {key: await self._tensor(tensor, f"{what}[{key!r}]") for key, tensor in tensors.items()}

    def _output_dtype(self, request: wire.Payload, default: int) -> int:
        requested = request.output_dtype
        if requested == pb.DTYPE_UNSPECIFIED:
            return default
        if requested not in codec.WIRE_DTYPES:
            raise InvalidRequest(
                f"output_dtype {requested} is not a known DType; leave it unset to get x's dtype", field="output_dtype"
            )
        return requested

    async def _batch(self, request: wire.Payload) -> tuple[np.ndarray, int]:
        """The layer name checked, x decoded, and the wire dtype of the answer (x's unless asked otherwise)."""
        check_name(request.layer, "layer")
        x = await self._input(request, "x", "the input batch")
        return x, self._output_dtype(request, request.x.dtype)

    async def _parameters(self, request: Any, layer: NormLayer) -> dict[str, np.ndarray]:
        """A training request's new weight and/or bias, checked against the layer."""
        keys = tuple(key for key in ("weight", "bias") if key in layer.state_keys)
        return await self._state_tensors(request.parameters, layer, keys, "parameters", "the layer's weight and bias")

    def _output_place(
        self, request: wire.Payload, shape: tuple[int, ...], dtype: int, streamed: bool, extra_bytes: int = 0
    ) -> pb.SharedMemoryRef | None:
        """Where the output goes, checked before any work: a shared-memory range, or (None) the answer,
        which must then fit one message unless it is streamed. ``extra_bytes``: the answer's other tensors."""
        needed = math.prod(shape) * codec.WIRE_DTYPES[dtype].itemsize
        if request.HasField("output_shared_memory"):
            place = self._shared_memory.output(request.output_shared_memory, "output_shared_memory", needed)
            needed = 0
        else:
            place = None
        answer = needed + extra_bytes + ANSWER_OVERHEAD_BYTES
        if not streamed and answer > self._limits.max_message_bytes:
            raise AnswerTooLarge(
                f"the answer would take about {answer} bytes, over the server's --max-message-bytes "
                f"({self._limits.max_message_bytes}); nothing was done. Use the call's Stream form (the Python "
                "client streams by itself above its stream_threshold), a narrower output_dtype, or smaller batches"
            )
        return place

    async def _respond(
        self, message: Any, field: str, array: np.ndarray, dtype: int, place: pb.SharedMemoryRef | None
    ) -> wire.Payload:
        """``message`` with ``array`` as its tensor ``field``: in the response, or written to ``place``."""
        tensor = getattr(message, field)
        header, data = codec.outgoing(array, dtype)
        if place is None:
            tensor.CopyFrom(header)
            return wire.Payload(message, {field: data})
        await self._shared_memory.write(place, data, "output_shared_memory")
        tensor.CopyFrom(pb.Tensor(dtype=dtype, shape=array.shape, shared_memory=place))
        return wire.Payload(message)

    @contextlib.contextmanager
    def _refusing_rank(self, request: Any) -> Iterator[SyncSpec | None]:
        """The request's sync spec (a bad one is refused alone); a refusal inside fails its step for the
        other ranks (:meth:`_refuse_rank`)."""
        sync = self._sync(request)
        try:
            yield sync
        except Exception as exc:
            self._refuse_rank(request, exc)
            raise

    def _refuse_rank(self, request: Any, error: Exception) -> None:
        """A synchronized rank refused for a bad request (or a stream that broke off) fails its step for the
        other ranks at once, rather than after --sync-timeout."""
        phase = _PHASES.get(request.DESCRIPTOR.name)
        if phase is not None and request.HasField("sync"):
            with contextlib.suppress(ServiceError):  # a bad spec names no step
                self._registry.refuse_rank(request.layer, self._sync(request), phase, error)

    @staticmethod
    def _sync(request: Any) -> SyncSpec | None:
        if not request.HasField("sync"):
            return None
        return SyncSpec(request.sync.id, request.sync.world_size, request.sync.rank, request.sync.step)

    async def _gather(self, requests: AsyncIterator[Any]) -> wire.Payload:
        """A streamed request as one Payload; its head (tensor sizes, layer name, that the layer exists and
        serves) is checked before any chunk is taken."""
        assembly = wire.Assembly(self._check)
        try:
            async for part in requests:
                assembly.take(part)
                if assembly.head is part:
                    self._registry.get(check_name(part.layer, "layer"))
            return assembly.result()
        except Exception as exc:
            if assembly.head is not None:
                self._refuse_rank(assembly.head, exc)
            raise

    # ------------------------------------------------------------------ layers
    @_rpc
    async def CreateLayer(self, request: pb.CreateLayerRequest, context: Any) -> pb.Layer:
        if not request.HasField("config"):
            raise InvalidRequest(
                "config is required: at least its kind and size (num_features or normalized_shape)", field="config"
            )
        with _about("config"):  # a config the layer refuses names it
            snapshot, _ = await self._registry.create(request.name, request.config, wait=self._wait(context))
        return describe_layer(snapshot)

    @_rpc
    async def GetLayer(self, request: pb.GetLayerRequest, context: Any) -> pb.Layer:
        return describe_layer(self._registry.describe(request.name))

    @_rpc
    async def ListLayers(self, request: pb.ListLayersRequest, context: Any) -> pb.ListLayersResponse:
        size, after = layer_pages.page_size(request.page_size), layer_pages.after_token(request.page_token)
        listed = (describe_layer(s) for s in self._registry.list(request.prefix) if s.name > after)
        return layer_pages.page(listed, size, self._limits.max_message_bytes)  # described as the page fills

    @_rpc
    async def DeleteLayer(self, request: pb.DeleteLayerRequest, context: Any) -> pb.DeleteLayerResponse:
        return pb.DeleteLayerResponse(
            layer=describe_layer(await self._registry.delete(request.name, wait=self._wait(context)))
        )

    # ------------------------------------------------------------------ statistics mode
    @_rpc
    async def TrainStatistics(self, request: pb.TrainStatisticsRequest, context: Any) -> pb.TrainStatisticsResponse:
        with self._refusing_rank(request) as sync:
            check_name(request.layer, "layer")
            if not request.HasField("statistics"):
                raise InvalidRequest(
                    "statistics is required: the batch's count and each group's mean and m2", field="statistics"
                )
            part = batch_statistics(request.statistics)
            layer = self._registry.get(request.layer).layer
            parameters = await self._parameters(request, layer)
        total, snapshot = await self._registry.train_statistics(
            request.layer, part, wait=self._wait(context), parameters=parameters, sync=sync
        )
        response = pb.TrainStatisticsResponse(
            statistics=describe_statistics(total),
            version=snapshot.version,
            num_batches_tracked=snapshot.layer.num_batches_tracked,
        )
        _running_stats(response, snapshot)
        return response

    @_rpc
    async def GradientStatistics(
        self, request: pb.GradientStatisticsRequest, context: Any
    ) -> pb.GradientStatisticsResponse:
        with self._refusing_rank(request) as sync:
            check_name(request.layer, "layer")
            if sync is None:
                raise InvalidRequest(
                    "sync is required: GradientStatistics combines the ranks of a synchronized step; "
                    "without sync the backward needs no server"
                )
            channels = math.prod(self._registry.get(request.layer).layer.param_shape)
            if not len(request.sum_dy) == len(request.sum_dy_xmu) == channels:
                raise InvalidRequest(
                    f"sum_dy and sum_dy_xmu must have one entry per channel ({channels}), got "
                    f"{len(request.sum_dy)} and {len(request.sum_dy_xmu)}"
                )
            count = _count(request.count, "count")
            part = GradSums(
                count, Moments(None, None), _sums(request.sum_dy, "sum_dy"), _sums(request.sum_dy_xmu, "sum_dy_xmu")
            )
        total = await self._registry.gradient_statistics(request.layer, part, sync, wait=self._wait(context))
        return pb.GradientStatisticsResponse(count=total.count, sum_dy=total.sum_dy, sum_dy_xmu=total.sum_dy_xmu)

    @_rpc_stream
    async def PushStatistics(
        self, requests: AsyncIterator[pb.PushStatisticsRequest], context: Any
    ) -> AsyncIterator[pb.PushStatisticsResponse]:
        expected = 1
        async for request in requests:
            if request.sequence != expected:  # a sender that lost count: its answers would be misread
                raise InvalidRequest(
                    f"message {request.sequence} of the stream, expected {expected}: number a stream's messages "
                    "1, 2, 3, ... (nothing of it was applied)",
                    field="sequence",
                )
            expected += 1
            yield await self._pushed(request)

    async def _pushed(self, request: pb.PushStatisticsRequest) -> pb.PushStatisticsResponse:
        """One PushStatistics message applied: every update decoded, refused or stored, and answered."""
        decoded: list[StatisticsUpdate | Exception] = []
        for index, update in enumerate(request.updates):
            try:
                if index >= MAX_UPDATES_PER_MESSAGE:
                    raise InvalidRequest(
                        f"a PushStatistics message holds at most {MAX_UPDATES_PER_MESSAGE} updates, this one "
                        f"{len(request.updates)}: send the rest in the next message (nothing of these was applied)"
                    )
                decoded.append(await self._statistics_update(update, f"updates[{index}]"))
            except Exception as exc:
                decoded.append(exc)
        try:
            results = iter(
                await self._registry.push_statistics(
                    [u for u in decoded if isinstance(u, StatisticsUpdate)], wait=self._limits.default_deadline
                )
            )
        except Exception as exc:  # the message as a whole could not run (shutting down, locks not had in time)
            results = itertools.repeat(exc)
        outcomes = (describe_outcome(u if isinstance(u, Exception) else next(results)) for u in decoded)
        return pb.PushStatisticsResponse(sequence=request.sequence, outcomes=outcomes)

    async def _statistics_update(self, update: pb.StatisticsUpdate, where: str) -> StatisticsUpdate:
        """One update of a PushStatistics message decoded and checked against its layer."""
        check_name(update.layer, f"{where}.layer")
        layer = self._registry.get(update.layer).layer
        mean, m2 = [await self._float64_tensor(getattr(update, key), f"{where}.{key}") for key in ("mean", "m2")]
        part = statistics_part(update.count, mean, m2, where)
        keys = tuple(key for key in ("weight", "bias") if key in layer.state_keys)
        parameters = await self._state_tensors(
            update.parameters, layer, keys, f"{where}.parameters", "the layer's weight and bias"
        )
        return StatisticsUpdate(update.layer, part, parameters)

    async def _float64_tensor(self, tensor: pb.Tensor, what: str) -> np.ndarray:
        if tensor.dtype != pb.FLOAT64 or len(tensor.shape) != 1:
            raise InvalidRequest(
                f"{what} must be a FLOAT64 tensor of shape [groups], got {pb.DType.Name(tensor.dtype)} of shape "
                f"{shorten(str(list(tensor.shape)), 100)}",
                field=what,
            )
        return await self._tensor(tensor, what)

    # ------------------------------------------------------------------ compute
    async def _train(self, request: wire.Payload, context: Any, streamed: bool = False) -> wire.Payload:
        with self._refusing_rank(request) as sync:
            x, out = await self._batch(request)
            layer = self._registry.get(request.layer).layer
            stats = _state_bytes(layer, RUNNING_KEYS) if request.return_running_stats else 0
            place = self._output_place(request, x.shape, out, streamed, stats)
            parameters = await self._parameters(request, layer)
        y, snapshot, forward_id = await self._registry.train(
            request.layer,
            x,
            wait=self._wait(context),
            keep_dtype=request.x.dtype if request.keep_forward else None,
            parameters=parameters,
            sync=sync,
        )
        response = pb.TrainResponse(
            version=snapshot.version, num_batches_tracked=snapshot.layer.num_batches_tracked, forward_id=forward_id
        )
        if request.return_running_stats:
            _running_stats(response, snapshot)
        return await self._respond(response, "y", y, out, place)

    async def _infer(self, request: wire.Payload, context: Any, streamed: bool = False) -> wire.Payload:
        x, out = await self._batch(request)
        place = self._output_place(request, x.shape, out, streamed)
        y, snapshot = await self._registry.infer(request.layer, x, wait=self._wait(context))
        return await self._respond(pb.InferResponse(version=snapshot.version), "y", y, out, place)

    async def _gradient(self, request: wire.Payload, context: Any, streamed: bool = False) -> wire.Payload:
        with self._refusing_rank(request) as sync:
            check_name(request.layer, "layer")
            kept = None
            if request.WhichOneof("forward") == "forward_id":
                kept = self._registry.kept_forward(request.layer, request.forward_id)
                x, out = kept.x, self._output_dtype(request, kept.wire_dtype)
            else:
                x, out = await self._batch(request)
            dy = await self._input(request, "dy", "the gradient of the loss with respect to the output, shaped like x")
            layer = self._registry.get(request.layer).layer
            place = self._output_place(request, x.shape, out, streamed, _state_bytes(layer, ("weight", "bias")))
        training = request.training if request.HasField("training") else True
        dx, grads, snapshot = await self._registry.gradient(
            request.layer,
            x,
            dy,
            training,
            wait=self._wait(context),
            snapshot=None if kept is None else kept.snapshot,
            sync=sync,
        )
        response = pb.GradientResponse(version=snapshot.version)
        for key, field in (("weight", response.dweight), ("bias", response.dbias)):
            if grads[key] is not None:
                field.CopyFrom(codec.encode(grads[key]))
        return await self._respond(response, "dx", dx, out, place)

    Train = _rpc(_train)
    Infer = _rpc(_infer)
    Gradient = _rpc(_gradient)
    TrainStream = _streaming(_train)
    InferStream = _streaming(_infer)
    GradientStream = _streaming(_gradient)

    # ------------------------------------------------------------------ state
    @_rpc
    async def GetState(self, request: pb.GetStateRequest, context: Any) -> pb.LayerState:
        layer = self._registry.get(request.name).layer
        nbytes = layer.state_nbytes
        if nbytes + ANSWER_OVERHEAD_BYTES > self._limits.max_message_bytes:
            raise AnswerTooLarge(
                f"layer {request.name!r} has {nbytes} bytes of state, more than one message may carry "
                f"(--max-message-bytes {self._limits.max_message_bytes}); raise that limit to read it"
            )
        kept = await self._registry.state_at(request.name, request.version if request.HasField("version") else None)

        def encode() -> pb.LayerState:
            state = pb.LayerState(
                name=request.name,
                version=kept.version,
                tensors={key: codec.encode(value) for key, value in kept.tensors.items()},
            )
            if "num_batches_tracked" in layer.state_keys:
                state.num_batches_tracked = kept.num_batches_tracked
            return state

        return encode() if nbytes <= INLINE_STATE_BYTES else await asyncio.to_thread(encode)

    @_rpc
    async def SetState(self, request: pb.SetStateRequest, context: Any) -> pb.Layer:
        layer = self._registry.get(check_name(request.name)).layer
        keys = tuple(key for key in layer.state_keys if key != "num_batches_tracked")
        state: dict[str, Any] = await self._state_tensors(request.tensors, layer, keys, "tensors", "the layer's state")
        if request.HasField("num_batches_tracked"):
            state["num_batches_tracked"] = np.int64(request.num_batches_tracked)
        if not state and request.partial:
            raise InvalidRequest("partial SetState carries no tensors and no num_batches_tracked: nothing to set")
        snapshot = await self._registry.set_state(
            request.name,
            state,
            expected_version=request.expected_version if request.HasField("expected_version") else None,
            partial=request.partial,
            wait=self._wait(context),
        )
        return describe_layer(snapshot)

    @_rpc
    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.Layer:
        snapshot = await self._registry.rollback(check_name(request.name), request.version, wait=self._wait(context))
        return describe_layer(snapshot)

    # ------------------------------------------------------------------ shared memory
    @_rpc
    async def RegisterSharedMemory(
        self, request: pb.RegisterSharedMemoryRequest, context: Any
    ) -> pb.SharedMemoryRegion:
        region = await self._shared_memory.register(
            request.name, request.key, request.offset, request.byte_size, client=context.peer()
        )
        return region.describe()

    @_rpc
    async def UnregisterSharedMemory(
        self, request: pb.UnregisterSharedMemoryRequest, context: Any
    ) -> pb.UnregisterSharedMemoryResponse:
        regions = self._shared_memory.unregister(request.name)
        return pb.UnregisterSharedMemoryResponse(regions=[r.describe() for r in regions])

    @_rpc
    async def ListSharedMemory(self, request: pb.ListSharedMemoryRequest, context: Any) -> pb.ListSharedMemoryResponse:
        return pb.ListSharedMemoryResponse(regions=[r.describe() for r in self._shared_memory.list()])
