"""asyncio client: :class:`AsyncNormClient` mirrors :class:`~normserve.client.NormClient` with async methods."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from normserve.client import protocol
from normserve.client.errors import error_from_rpc
from normserve.v1 import normalization_pb2 as pb

__all__ = ["AsyncNormClient", "AsyncRemoteLayer"]


class AsyncNormClient(protocol.ClientBase):
    """:class:`~normserve.client.NormClient` for asyncio: the same arguments, coroutine methods.

    Use it as ``async with AsyncNormClient(target) as nc:`` or await :meth:`close`.
    """

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncNormClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Send one RPC by name, retrying UNAVAILABLE where that is safe; raises NormServeError."""
        rpc = self._rpc(method)
        backoffs = self.retry.backoffs(method)
        for attempt in itertools.count():
            try:
                return await rpc(request, timeout=self._timeout(timeout), metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= len(backoffs):
                    raise error_from_rpc(error, method) from None
            await asyncio.sleep(backoffs[attempt])
        raise AssertionError("unreachable")

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health (``"SERVING"``, ``"NOT_SERVING"``, ...); ``service`` "" is the whole server."""
        response = await self.call("Health/Check", health_pb2.HealthCheckRequest(service=service), timeout)
        return protocol.health_status(response)

    # ------------------------------------------------------------------ layers
    async def create_layer(
        self, name: str, kind: str, *, timeout: float | None = None, **config: Any
    ) -> AsyncRemoteLayer:
        """Create (or, with an equal config, get) a layer; config takes PyTorch's constructor arguments."""
        request = pb.CreateLayerRequest(name=name, config=protocol.layer_config(kind, **config))
        return AsyncRemoteLayer(self, await self.call("CreateLayer", request, timeout))

    async def layer(self, name: str, *, timeout: float | None = None) -> AsyncRemoteLayer:
        """A handle on an existing layer (NotFound when there is none)."""
        return AsyncRemoteLayer(self, await self.call("GetLayer", pb.GetLayerRequest(name=name), timeout))

    async def list_layers(self, prefix: str = "", *, timeout: float | None = None) -> list[AsyncRemoteLayer]:
        response = await self.call("ListLayers", pb.ListLayersRequest(prefix=prefix), timeout)
        return [AsyncRemoteLayer(self, info) for info in response.layers]

    async def delete_layer(self, name: str, *, timeout: float | None = None) -> pb.Layer:
        """Delete a layer and its state; returns its last description."""
        return (await self.call("DeleteLayer", pb.DeleteLayerRequest(name=name), timeout)).layer


class AsyncRemoteLayer(protocol.LayerHandle):
    """:class:`~normserve.client.RemoteLayer` with async methods."""

    async def refresh(self, *, timeout: float | None = None) -> pb.Layer:
        self.info = await self._client.call("GetLayer", pb.GetLayerRequest(name=self.name), timeout)
        return self.info

    async def _forward(self, method: str, x: Any, wire_dtype: Any, timeout: float | None) -> np.ndarray:
        request, dtype = protocol.forward_request(method, self.name, x, self._wire(wire_dtype))
        return self._forward_result(await self._client.call(method, request, timeout), dtype)

    async def train(self, x: Any, *, wire_dtype: Any = None, timeout: float | None = None) -> np.ndarray:
        """Training-mode forward: normalize with batch statistics and update the running statistics."""
        return await self._forward("Train", x, wire_dtype, timeout)

    async def infer(self, x: Any, *, wire_dtype: Any = None, timeout: float | None = None) -> np.ndarray:
        """Inference-mode forward with the running statistics; changes nothing."""
        return await self._forward("Infer", x, wire_dtype, timeout)

    async def gradient(
        self, x: Any, dy: Any, training: bool = True, *, wire_dtype: Any = None, timeout: float | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``(dx, dweight, dbias)`` of ``sum(forward(x) * dy)``; None for a missing weight or bias."""
        request, dtype = protocol.gradient_request(self.name, x, dy, training, self._wire(wire_dtype))
        return protocol.gradient_result(await self._client.call("Gradient", request, timeout), dtype)

    async def state_dict(self, *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The state under PyTorch's keys (``num_batches_tracked`` as an int64 scalar array)."""
        return protocol.state_dict(await self._client.call("GetState", pb.GetStateRequest(name=self.name), timeout))

    async def load_state_dict(
        self,
        state: Mapping[str, Any],
        strict: bool = True,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> pb.Layer:
        """See :meth:`normserve.client.RemoteLayer.load_state_dict`."""
        request = protocol.load_state_request(self.name, state, strict, expected_version)
        self.info = await self._client.call("SetState", request, timeout)
        return self.info

    async def delete(self, *, timeout: float | None = None) -> pb.Layer:
        return await self._client.delete_layer(self.name, timeout=timeout)
