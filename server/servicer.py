"""The Normalization servicer: wire messages in, registry calls, wire messages out.

Each method validates and decodes its request, calls the registry, and
encodes the answer. Errors become status codes in one place (:func:`_rpc`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from normserve.server.errors import InvalidRequest, status_for
from normserve.server.layer_config import check_name, describe_config
from normserve.server.registry import Registry, Snapshot, TrainingStats, host_state
from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import normalization_pb2_grpc as pb_grpc

__all__ = ["Limits", "NormalizationServicer", "describe_layer"]

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Response = TypeVar("Response")


@dataclass(frozen=True)
class Limits:
    """What one request may ask: larger tensors answer RESOURCE_EXHAUSTED; a call
    without a deadline waits at most ``default_deadline`` seconds to start."""

    max_tensor_bytes: int = 1 << 30
    max_tensor_elements: int = 1 << 28
    default_deadline: float = 60.0


def _rpc(
    method: Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]],
) -> Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]:
    """Turn domain errors into status codes with their messages; anything else is INTERNAL."""

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: grpc.aio.ServicerContext) -> Response:
        try:
            return await method(self, request, context)
        except Exception as exc:
            code = status_for(exc)
            if code is None:
                log.exception("%s failed", method.__name__)
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"{method.__name__} failed inside the server ({type(exc).__name__}); "
                    "the server log has the details",
                )
            await context.abort(code, str(exc))

    return handler


def describe_stats(stats: TrainingStats) -> pb.LayerStats:
    message = pb.LayerStats(train_calls=stats.train_calls)
    if stats.last is not None:
        for field, value in stats.last._asdict().items():
            if value is not None:
                setattr(message, field, value)
    return message


def describe_layer(snapshot: Snapshot) -> pb.Layer:
    layer = snapshot.layer
    return pb.Layer(
        name=snapshot.name,
        config=describe_config(layer),
        version=snapshot.version,
        num_batches_tracked=layer.num_batches_tracked,
        param_shape=layer.param_shape,
        state_keys=layer.state_keys,
        stats=describe_stats(snapshot.stats),
    )


class NormalizationServicer(pb_grpc.NormalizationServicer):
    def __init__(self, registry: Registry, limits: Limits) -> None:
        self._registry = registry
        self._limits = limits

    # ------------------------------------------------------------------ decoding helpers
    def _wait(self, context: grpc.aio.ServicerContext) -> float:
        """How long this call may wait to start: its own deadline, else the server's default."""
        remaining = context.time_remaining()
        return self._limits.default_deadline if remaining is None else remaining

    def _tensor(self, tensor: pb.Tensor, what: str) -> np.ndarray:
        array = codec.decode(
            tensor, what, max_elements=self._limits.max_tensor_elements, max_bytes=self._limits.max_tensor_bytes
        )
        # bfloat16 is a wire format only: the kernels compute it in float32.
        return array.astype(np.float32) if tensor.dtype == pb.BFLOAT16 else array

    def _input(self, request: Any, field: str, meaning: str) -> np.ndarray:
        if not request.HasField(field):
            raise InvalidRequest(f"{field} is required: {meaning}")
        return self._tensor(getattr(request, field), field)

    def _batch(self, request: Any) -> tuple[np.ndarray, int]:
        """The layer name checked, x decoded, and the wire dtype of the answer (x's unless asked otherwise)."""
        check_name(request.layer, "layer")
        x = self._input(request, "x", "the input batch")
        requested = request.output_dtype
        if requested == pb.DTYPE_UNSPECIFIED:
            return x, request.x.dtype
        if requested not in codec.WIRE_DTYPES:
            raise InvalidRequest(f"output_dtype {requested} is not a known DType; leave it unset to get x's dtype")
        return x, requested

    # ------------------------------------------------------------------ layers
    @_rpc
    async def CreateLayer(self, request: pb.CreateLayerRequest, context: Any) -> pb.Layer:
        if not request.HasField("config"):
            raise InvalidRequest("config is required: at least its kind and size (num_features or normalized_shape)")
        snapshot, _ = await self._registry.create(request.name, request.config, wait=self._wait(context))
        return describe_layer(snapshot)

    @_rpc
    async def GetLayer(self, request: pb.GetLayerRequest, context: Any) -> pb.Layer:
        return describe_layer(self._registry.get(request.name))

    @_rpc
    async def ListLayers(self, request: pb.ListLayersRequest, context: Any) -> pb.ListLayersResponse:
        return pb.ListLayersResponse(layers=[describe_layer(s) for s in self._registry.list(request.prefix)])

    @_rpc
    async def DeleteLayer(self, request: pb.DeleteLayerRequest, context: Any) -> pb.DeleteLayerResponse:
        return pb.DeleteLayerResponse(
            layer=describe_layer(await self._registry.delete(request.name, wait=self._wait(context)))
        )

    # ------------------------------------------------------------------ compute
    @_rpc
    async def Train(self, request: pb.TrainRequest, context: Any) -> pb.TrainResponse:
        x, out = self._batch(request)
        y, snapshot = await self._registry.train(request.layer, x, wait=self._wait(context))
        return pb.TrainResponse(
            y=codec.encode(y, out), version=snapshot.version, num_batches_tracked=snapshot.layer.num_batches_tracked
        )

    @_rpc
    async def Infer(self, request: pb.InferRequest, context: Any) -> pb.InferResponse:
        x, out = self._batch(request)
        y, snapshot = await self._registry.infer(request.layer, x, wait=self._wait(context))
        return pb.InferResponse(y=codec.encode(y, out), version=snapshot.version)

    @_rpc
    async def Gradient(self, request: pb.GradientRequest, context: Any) -> pb.GradientResponse:
        x, out = self._batch(request)
        dy = self._input(request, "dy", "the gradient of the loss with respect to the output, shaped like x")
        training = request.training if request.HasField("training") else True
        dx, grads, snapshot = await self._registry.gradient(request.layer, x, dy, training, wait=self._wait(context))
        response = pb.GradientResponse(dx=codec.encode(dx, out), version=snapshot.version)
        for key, field in (("weight", response.dweight), ("bias", response.dbias)):
            if grads[key] is not None:
                field.CopyFrom(codec.encode(grads[key]))
        return response

    # ------------------------------------------------------------------ state
    @_rpc
    async def GetState(self, request: pb.GetStateRequest, context: Any) -> pb.LayerState:
        snapshot = self._registry.get(request.name)
        state = pb.LayerState(
            name=snapshot.name,
            version=snapshot.version,
            tensors={key: codec.encode(value) for key, value in host_state(snapshot.layer).items()},
        )
        if "num_batches_tracked" in snapshot.layer.state_keys:
            state.num_batches_tracked = snapshot.layer.num_batches_tracked
        return state

    @_rpc
    async def SetState(self, request: pb.SetStateRequest, context: Any) -> pb.Layer:
        check_name(request.name)
        state: dict[str, Any] = {key: self._tensor(t, f"tensors[{key!r}]") for key, t in request.tensors.items()}
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
