"""asyncio client: :class:`AsyncNormClient` mirrors :class:`~normserve.client.NormClient` with async methods."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from normserve.client import protocol
from normserve.client.errors import NormServeError, error_from_rpc
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
        """Unregister the shared-memory regions this client created (best effort), and close the channel."""
        if self._regions:
            with contextlib.suppress(NormServeError):
                await self.unregister_shared_memory(*self._regions, timeout=2)
        await self._channel.close()

    async def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """See :meth:`normserve.client.NormClient.call`."""
        if self._streams(method, request):
            send = functools.partial(self._stream, self._rpc(method + "Stream"), request)
        else:
            send = functools.partial(self._rpc(method), request)
        backoffs = self.retry.backoffs(method)
        for attempt in itertools.count():
            try:
                return await send(timeout=self._timeout(timeout), metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= len(backoffs):
                    raise error_from_rpc(error, method) from None
            await asyncio.sleep(backoffs[attempt])
        raise AssertionError("unreachable")

    async def _stream(self, rpc: Any, request: Any, **kwargs: Any) -> Any:
        assembly = protocol.answer_assembly()
        async for part in rpc(self._stream_parts(request), **kwargs):
            assembly.take(part)
        return assembly.result()

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

    # ------------------------------------------------------------------ shared memory
    async def create_shared_memory(
        self, name: str, byte_size: int, *, timeout: float | None = None
    ) -> protocol.SharedMemoryRegion:
        """See :meth:`normserve.client.NormClient.create_shared_memory` (``async with`` it)."""
        region = self._new_region(name, byte_size, lambda: self.unregister_shared_memory(name))
        try:
            await self.register_shared_memory(name, region.key, byte_size, timeout=timeout)
        except BaseException:
            region.close()
            raise
        self._regions[name] = region
        return region

    async def register_shared_memory(
        self, name: str, key: str, byte_size: int, offset: int = 0, *, timeout: float | None = None
    ) -> pb.SharedMemoryRegion:
        request = pb.RegisterSharedMemoryRequest(name=name, key=key, offset=offset, byte_size=byte_size)
        return await self.call("RegisterSharedMemory", request, timeout)

    async def unregister_shared_memory(self, *names: str, timeout: float | None = None) -> list[pb.SharedMemoryRegion]:
        regions = []
        for name in names or ("",):
            response = await self.call("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name), timeout)
            regions += response.regions
        self._forget_regions(regions)
        return regions

    async def list_shared_memory(self, *, timeout: float | None = None) -> list[pb.SharedMemoryRegion]:
        return list((await self.call("ListSharedMemory", pb.ListSharedMemoryRequest(), timeout)).regions)


class AsyncRemoteLayer(protocol.LayerHandle):
    """:class:`~normserve.client.RemoteLayer` with async methods."""

    async def refresh(self, *, timeout: float | None = None) -> pb.Layer:
        self.info = await self._client.call("GetLayer", pb.GetLayerRequest(name=self.name), timeout)
        return self.info

    async def _forward(self, method: str, request: protocol.Request, timeout: float | None) -> np.ndarray:
        return self._forward_result(await self._client.call(method, request.message, timeout), request)

    async def train(
        self,
        x: Any,
        *,
        keep_forward: bool = False,
        out: np.ndarray | None = None,
        wire_dtype: Any = None,
        sync: protocol.SyncGroup | None = None,
        parameters: Mapping[str, Any] | None = None,
        return_running_stats: bool = False,
        timeout: float | None = None,
    ) -> np.ndarray:
        """See :meth:`normserve.client.RemoteLayer.train`."""
        request = self._train_request(x, wire_dtype, out, keep_forward, sync, parameters, return_running_stats)
        return await self._forward("Train", request, timeout)

    async def infer(
        self, x: Any, *, out: np.ndarray | None = None, wire_dtype: Any = None, timeout: float | None = None
    ) -> np.ndarray:
        """Inference-mode forward with the running statistics; changes nothing."""
        return await self._forward("Infer", self._forward_request("Infer", x, wire_dtype, out), timeout)

    async def gradient(
        self,
        x: Any,
        dy: Any,
        training: bool = True,
        *,
        forward_id: str | None = None,
        out: np.ndarray | None = None,
        wire_dtype: Any = None,
        sync: protocol.SyncGroup | None = None,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """See :meth:`normserve.client.RemoteLayer.gradient`."""
        request = self._gradient_request(x, dy, training, wire_dtype, forward_id, out, sync)
        return protocol.gradient_result(await self._client.call("Gradient", request.message, timeout), request)

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
