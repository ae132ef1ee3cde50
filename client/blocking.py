"""Blocking client: :class:`NormClient` and the :class:`RemoteLayer` handles it returns."""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from normserve.client import protocol
from normserve.client.errors import NormServeError, error_from_rpc
from normserve.v1 import normalization_pb2 as pb

__all__ = ["NormClient", "RemoteLayer"]


class NormClient(protocol.ClientBase):
    """A blocking connection to a normserve server.

    ``timeout`` (seconds) applies to every call unless the call passes its
    own; ``wire_dtype`` (``None`` = each array's own dtype, or ``"float16"``,
    ``"bfloat16"``, ...) is the default dtype tensors travel in; ``retry``
    resends idempotent calls that fail with UNAVAILABLE. Use it as a context
    manager, or call :meth:`close`.

    Security: ``token`` is sent as ``authorization: Bearer <token>`` on every
    call. ``tls=True`` (implied by any of the next arguments) uses TLS;
    ``ca_cert`` verifies the server (default: the system's roots);
    ``client_cert`` and ``client_key`` answer a server that requires mutual
    TLS; ``server_name`` is the name in the server's certificate when the
    target address differs. PEM arguments are bytes or file paths.
    """

    _grpc = grpc

    def __enter__(self) -> NormClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Unregister the shared-memory regions this client created (best effort), and close the channel."""
        if self._regions:
            with contextlib.suppress(NormServeError):
                self.unregister_shared_memory(*self._regions, timeout=2)
        self._channel.close()

    def call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """Send one RPC by name (large tensors through its streaming form), retrying UNAVAILABLE where
        that is safe; raises NormServeError."""
        if self._streams(method, request):
            send = functools.partial(self._stream, self._rpc(method + "Stream"), request)
        else:
            send = functools.partial(self._rpc(method), request)
        backoffs = self.retry.backoffs(method)
        for attempt in itertools.count():
            try:
                return send(timeout=self._timeout(timeout), metadata=self._metadata)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= len(backoffs):
                    raise error_from_rpc(error, method) from None
            time.sleep(backoffs[attempt])
        raise AssertionError("unreachable")

    def _stream(self, rpc: Any, request: Any, **kwargs: Any) -> Any:
        assembly = protocol.answer_assembly()
        for part in rpc(self._stream_parts(request), **kwargs):
            assembly.take(part)
        return assembly.result()

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health (``"SERVING"``, ``"NOT_SERVING"``, ...); ``service`` "" is the whole server."""
        response = self.call("Health/Check", health_pb2.HealthCheckRequest(service=service), timeout)
        return protocol.health_status(response)

    # ------------------------------------------------------------------ layers
    def create_layer(self, name: str, kind: str, *, timeout: float | None = None, **config: Any) -> RemoteLayer:
        """Create (or, with an equal config, get) a layer; config takes PyTorch's constructor arguments."""
        request = pb.CreateLayerRequest(name=name, config=protocol.layer_config(kind, **config))
        return RemoteLayer(self, self.call("CreateLayer", request, timeout))

    def layer(self, name: str, *, timeout: float | None = None) -> RemoteLayer:
        """A handle on an existing layer (NotFound when there is none)."""
        return RemoteLayer(self, self.call("GetLayer", pb.GetLayerRequest(name=name), timeout))

    def list_layers(self, prefix: str = "", *, timeout: float | None = None) -> list[RemoteLayer]:
        response = self.call("ListLayers", pb.ListLayersRequest(prefix=prefix), timeout)
        return [RemoteLayer(self, info) for info in response.layers]

    def delete_layer(self, name: str, *, timeout: float | None = None) -> pb.Layer:
        """Delete a layer and its state; returns its last description."""
        return self.call("DeleteLayer", pb.DeleteLayerRequest(name=name), timeout).layer

    # ------------------------------------------------------------------ shared memory
    def create_shared_memory(
        self, name: str, byte_size: int, *, timeout: float | None = None
    ) -> protocol.SharedMemoryRegion:
        """Create a POSIX shared-memory object of ``byte_size`` bytes and register it as region ``name``.

        Arrays from its ``array()`` then travel by reference, and may be
        ``out=`` of train/infer/gradient. Needs a server on this host started
        with ``--shared-memory``. ``with`` it (or :meth:`unregister_shared_memory`) to free it.
        """
        region = self._new_region(name, byte_size, lambda: self.unregister_shared_memory(name))
        try:
            self.register_shared_memory(name, region.key, byte_size, timeout=timeout)
        except BaseException:
            region.close()
            raise
        self._regions[name] = region
        return region

    def register_shared_memory(
        self, name: str, key: str, byte_size: int, offset: int = 0, *, timeout: float | None = None
    ) -> pb.SharedMemoryRegion:
        """Register a byte range of an existing POSIX shared-memory object ``key`` as region ``name``."""
        request = pb.RegisterSharedMemoryRequest(name=name, key=key, offset=offset, byte_size=byte_size)
        return self.call("RegisterSharedMemory", request, timeout)

    def unregister_shared_memory(self, *names: str, timeout: float | None = None) -> list[pb.SharedMemoryRegion]:
        """Unregister regions (all without names); regions this client created are unlinked too."""
        regions = []
        for name in names or ("",):
            response = self.call("UnregisterSharedMemory", pb.UnregisterSharedMemoryRequest(name=name), timeout)
            regions += response.regions
        self._forget_regions(regions)
        return regions

    def list_shared_memory(self, *, timeout: float | None = None) -> list[pb.SharedMemoryRegion]:
        return list(self.call("ListSharedMemory", pb.ListSharedMemoryRequest(), timeout).regions)


class RemoteLayer(protocol.LayerHandle):
    """A named layer on the server. Arrays go in as NumPy, CuPy or torch; results come back as NumPy.

    Results have the input's dtype whatever the wire dtype was; weight and
    bias gradients and state tensors have the layer's param dtype. ``info``
    (``version``, ``num_batches_tracked``) follows what the calls report.
    """

    def refresh(self, *, timeout: float | None = None) -> pb.Layer:
        self.info = self._client.call("GetLayer", pb.GetLayerRequest(name=self.name), timeout)
        return self.info

    def _forward(self, method: str, request: protocol.Request, timeout: float | None) -> np.ndarray:
        return self._forward_result(self._client.call(method, request.message, timeout), request)

    def train(
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
        """Training-mode forward: normalize with batch statistics and update the running statistics.

        ``keep_forward=True`` has the server keep x, so ``gradient(None, dy)``
        need not send it again (see :attr:`forward_id`). ``out``, an array in
        one of the client's shared-memory regions, receives y (and is returned).

        ``parameters`` (``{"weight": ..., "bias": ...}``, either or both) become
        the layer's parameters before this batch, stored with its update: how a
        locally stepped optimizer reaches the server without a call of its own.
        ``sync`` (a :class:`SyncGroup` at a step) makes the batch one rank's part
        of a synchronized step. ``return_running_stats`` fills :attr:`running_stats`.
        """
        request = self._train_request(x, wire_dtype, out, keep_forward, sync, parameters, return_running_stats)
        return self._forward("Train", request, timeout)

    def infer(
        self, x: Any, *, out: np.ndarray | None = None, wire_dtype: Any = None, timeout: float | None = None
    ) -> np.ndarray:
        """Inference-mode forward with the running statistics; changes nothing."""
        return self._forward("Infer", self._forward_request("Infer", x, wire_dtype, out), timeout)

    def gradient(
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
        """``(dx, dweight, dbias)`` of ``sum(forward(x) * dy)``; None for a missing weight or bias.

        ``x=None`` differentiates a kept forward instead: ``forward_id``, or
        the last ``train(..., keep_forward=True)`` of this handle (its x and
        the weight and bias it ran with). FailedPrecondition means the server
        dropped it: call again with x. ``sync``: the same step as the Train's
        (training mode only); dweight and dbias are then this rank's own share.
        """
        request = self._gradient_request(x, dy, training, wire_dtype, forward_id, out, sync)
        return protocol.gradient_result(self._client.call("Gradient", request.message, timeout), request)

    def state_dict(self, *, timeout: float | None = None) -> dict[str, np.ndarray]:
        """The state under PyTorch's keys (``num_batches_tracked`` as an int64 scalar array)."""
        return protocol.state_dict(self._client.call("GetState", pb.GetStateRequest(name=self.name), timeout))

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        strict: bool = True,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> pb.Layer:
        """Replace the state, all or nothing (a torch ``state_dict()`` works as is).

        ``strict=False`` updates only the keys given; ``expected_version``
        makes the update conditional (FailedPrecondition when stale).
        """
        request = protocol.load_state_request(self.name, state, strict, expected_version)
        self.info = self._client.call("SetState", request, timeout)
        return self.info

    def delete(self, *, timeout: float | None = None) -> pb.Layer:
        return self._client.delete_layer(self.name, timeout=timeout)
