"""Every client method, written once as a plan that the blocking and the asyncio client each carry out.

A plan is a generator function. It yields *steps*, zero-argument callables
such as an RPC with its request bound, and is sent back each step's result.
A step that fails is thrown back into the plan at its ``yield``, so plans
handle errors with plain ``try``. Only the waiting differs between the
clients: :mod:`normserve.client.blocking` calls a step and has its result,
:mod:`normserve.client.aio` awaits what calling it returns. Each of them has
one ``_run`` that does that, and turns every :func:`operation` here into a
method of its own (``class NormClient(ClientOperations, make_method=...)``).

Adding an RPC therefore means writing one operation here: both clients get
it, with the same signature and docstring.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import re
from collections.abc import Callable, Generator, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from normserve.client import protocol
from normserve.client.errors import NormServeError, NotFound, error_from_rpc
from normserve.v1 import normalization_pb2 as pb

__all__ = ["ClientOperations", "Handle", "LayerOperations", "MethodMaker", "Operation", "Plan", "Step", "operation"]

_T = TypeVar("_T")
#: One thing to wait for: the blocking client calls it for its result; the asyncio client awaits what it returns.
Step = Callable[[], Any]
#: What an operation is written as: yields steps, is sent their results, returns the method's result.
Plan = Generator[Step, Any, _T]
#: Turns a plan function into a client's method (the blocking or the asyncio way of waiting).
MethodMaker = Callable[[Callable[..., Plan[Any]]], Callable[..., Any]]
#: In a plan's return annotation: the layer handle class of the client at hand (RemoteLayer, AsyncRemoteLayer).
Handle = TypeVar("Handle", bound="LayerOperations")


class Operation(Generic[_T]):
    """A plan on a class body, waiting to become a method of each client class (see :func:`operation`)."""

    def __init__(self, plan: Callable[..., Plan[_T]]) -> None:
        self.plan = plan


def operation(plan: Callable[..., Plan[_T]]) -> Operation[_T]:
    """Declare a public client method by its plan; its signature and docstring are the method's."""
    return Operation(plan)


class _Operations:
    """Turns the operations of a class into methods of each subclass that says how it waits (``make_method``)."""

    def __init_subclass__(cls, make_method: MethodMaker | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if make_method is None:
            return
        attributes: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):  # what cls sees under each name: a subclass's own method wins
            attributes.update(vars(klass))
        for name, value in attributes.items():
            if isinstance(value, Operation):
                setattr(cls, name, _dressed_method(cls, name, value.plan, make_method))


def _dressed_method(
    cls: type, name: str, plan: Callable[..., Plan[Any]], make_method: MethodMaker
) -> Callable[..., Any]:
    """``make_method(plan)`` dressed as a method written on ``cls``, so that help(), tracebacks and
    inspect.signature show the method's name, docstring, arguments and result, not the plan's."""
    method = make_method(plan)
    returns = _result_annotation(plan.__annotations__.get("return", "Any"), getattr(cls, "_handle", None))
    method.__name__ = name
    method.__qualname__ = f"{cls.__qualname__}.{name}"
    method.__module__ = cls.__module__
    method.__doc__ = plan.__doc__
    method.__annotations__ = {**plan.__annotations__, "return": returns}
    method.__signature__ = inspect.signature(plan).replace(return_annotation=returns)
    return method


def _result_annotation(plan_returns: str, handle: type | None) -> str:
    """``"Plan[list[Handle]]"`` -> ``"list[RemoteLayer]"`` (annotations are strings here: postponed evaluation)."""
    returns = plan_returns.removeprefix("Plan[").removesuffix("]")
    return returns if handle is None else re.sub(r"\bHandle\b", handle.__name__, returns)


class ClientOperations(protocol.ClientBase, _Operations):
    """The methods of both clients. A subclass sets ``_handle`` (its layer handle class), ``_sleep``
    (how it waits out a retry backoff) and ``_stream`` (how it sends a streamed call)."""

    _handle: ClassVar[type[LayerOperations]]
    _sleep: Callable[[float], Any]
    _stream: Callable[..., Any]

    def _call_step(self, method: str, request: Any, timeout: float | None) -> Step:
        # Through the call attribute, so that whatever stands there (a wrapper counting RPCs) sees every RPC.
        return functools.partial(self.call, method, request, timeout)

    @operation
    def close(self) -> Plan[None]:
        """Wait for the statistics-mode updates in flight (blocking client), unregister the shared-memory
        regions this client created (best effort), and close the channel. A statistics-mode failure no
        module raised yet is raised then."""
        pipeline, unfinished = self._pipeline, None
        if pipeline is not None:
            try:
                yield pipeline.close
            except NormServeError as error:  # a failure, or still in flight after the timeout: said after closing
                unfinished = error
        if self._regions:
            with contextlib.suppress(NormServeError):
                yield functools.partial(self.unregister_shared_memory, *self._regions, timeout=2)
        yield self._channel.close
        if unfinished is not None:
            raise unfinished

    @operation
    def call(self, method: str, request: Any, timeout: float | None = None) -> Plan[Any]:
        """Send one RPC by name (large tensors through its streaming form), retrying UNAVAILABLE where
        that is safe; raises NormServeError."""
        # The one retry loop of both clients. gRPC's own retries (a service-config retryPolicy) would not
        # honour a RetryPolicy: grpcio clamps attempts at 5, randomizes each backoff, and never resends a
        # request, streamed or not, larger than its replay buffer (256 KiB by default): a 1 MiB Infer.
        options = {"timeout": self._timeout(timeout), "metadata": self._call_metadata(request)}
        if self._streams(method, request):
            send = functools.partial(self._stream, self._rpc(method + "Stream"), request, **options)
        else:
            send = functools.partial(self._rpc(method), request, **options)
        for attempt in itertools.count():
            try:
                response = yield send
            except grpc.RpcError as error:
                backoffs = self.retry.backoffs(method)  # worked out after a failure only: off the hot path
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= len(backoffs):
                    raise error_from_rpc(error, method) from None
            else:
                protocol.check_answer(method, request, response)  # before anything of it is used
                return response
            yield functools.partial(self._sleep, backoffs[attempt])
        raise AssertionError("unreachable")

    @operation
    def health(self, service: str = "", *, timeout: float | None = None) -> Plan[str]:
        """The server's health (``"SERVING"``, ``"NOT_SERVING"``, ...); ``service`` "" is the whole server."""
        try:
            response = yield self._call_step("Health/Check", health_pb2.HealthCheckRequest(service=service), timeout)
        except NotFound as error:
            raise NotFound(
                f"the server reports no health for service {service!r}: ask for '' (the whole server) or "
                f"{protocol.SERVICE_NAME!r}",
                code=error.code,
                method=error.method,
            ) from None
        return protocol.health_status(response)

    # ------------------------------------------------------------------ layers
    @operation
    def create_layer(self, name: str, kind: str, *, timeout: float | None = None, **config: Any) -> Plan[Handle]:
        """Create (or, with an equal config, get) a layer; config takes PyTorch's constructor arguments."""
        request = pb.CreateLayerRequest(name=name, config=protocol.layer_config(kind, **config))
        return self._handle(self, (yield self._call_step("CreateLayer", request, timeout)))

    @operation
    def layer(self, name: str, *, timeout: float | None = None) -> Plan[Handle]:
        """A handle on an existing layer (NotFound when there is none)."""
        return self._handle(self, (yield self._call_step("GetLayer", pb.GetLayerRequest(name=name), timeout)))

    @operation
    def list_layers(self, prefix: str = "", *, timeout: float | None = None) -> Plan[list[Handle]]:
        """Every layer (whose name starts with ``prefix``), sorted by name: the server's pages, asked one
        after another (``timeout`` applies to each)."""
        layers: list[Handle] = []
        token = ""
        while True:
            request = pb.ListLayersRequest(prefix=prefix, page_token=token)
            response = yield self._call_step("ListLayers", request, timeout)
            layers += [self._handle(self, info) for info in response.layers]
            token = protocol.next_page(token, response)
            if not token:
                return layers

    @operation
    def delete_layer(self, name: str, *, timeout: float | None = None) -> Plan[pb.Layer]:
        """Delete a layer and its state; returns its last description."""
        return (yield self._call_step("DeleteLayer", pb.DeleteLayerRequest(name=name), timeout)).layer

    @operation
    def rollback_layer(self, name: str, version: int, *, timeout: float | None = None) -> Plan[pb.Layer]:
        """Make a kept version's state (``oldest_version`` to ``version`` of the layer's description) the
        layer's state again, as a new version; returns the layer's description after."""
        return (yield self._call_step("Rollback", pb.RollbackRequest(name=name, version=version), timeout))

    # ------------------------------------------------------------------ shared memory
    @operation
    def create_shared_memory(
        self, name: str, byte_size: int, *, timeout: float | None = None
    ) -> Plan[protocol.SharedMemoryRegion]:
        """Create a POSIX shared-memory object of ``byte_size`` bytes and register it as region ``name``.

        Arrays from its ``array()`` then travel by reference, and may be
        ``out=`` of train/infer/gradient. Needs a server on this host started
        with ``--shared-memory``. ``with`` it (``async with`` for the asyncio
        client), or call :meth:`unregister_shared_memory`, to free it.
        """
        region = self._new_region(name, byte_size, lambda: self.unregister_shared_memory(name))
        try:
            yield functools.partial(self.register_shared_memory, name, region.key, byte_size, timeout=timeout)
        except BaseException:
            region.close()
            raise
        self._regions[name] = region
        return region

    @operation
    def register_shared_memory(
        self, name: str, key: str, byte_size: int, offset: int = 0, *, timeout: float | None = None
    ) -> Plan[pb.SharedMemoryRegion]:
        """Register a byte range of an existing POSIX shared-memory object ``key`` as region ``name``."""
        request = pb.RegisterSharedMemoryRequest(name=name, key=key, offset=offset, byte_size=byte_size)
        return (yield self._call_step("RegisterSharedMemory", request, timeout))

    @operation
    def unregister_shared_memory(self, *names: str, timeout: float | None = None) -> Plan[list[pb.SharedMemoryRegion]]:
        """Unregister regions (all without names); regions this client created are unlinked too."""
        regions = []
        for name in names or ("",):
            request = pb.UnregisterSharedMemoryRequest(name=name)
            regions += (yield self._call_step("UnregisterSharedMemory", request, timeout)).regions
        self._forget_regions(regions)
        return regions

    @operation
    def list_shared_memory(self, *, timeout: float | None = None) -> Plan[list[pb.SharedMemoryRegion]]:
        return list((yield self._call_step("ListSharedMemory", pb.ListSharedMemoryRequest(), timeout)).regions)


class LayerOperations(protocol.LayerHandle, _Operations):
    """The methods of both clients' layer handles."""

    def _call_step(self, method: str, request: Any, timeout: float | None) -> Step:
        # Through the client's call attribute, as ClientOperations._call_step.
        return functools.partial(self._client.call, method, request, timeout)

    @operation
    def refresh(self, *, timeout: float | None = None) -> Plan[protocol.LayerInfo]:
        """Ask the server for the layer's description: ``.info`` becomes it, and it comes back as Python values."""
        self.info = yield self._call_step("GetLayer", pb.GetLayerRequest(name=self.name), timeout)
        return protocol.layer_info(self.info)

    @operation
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
    ) -> Plan[np.ndarray]:
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
        return self._forward_result((yield self._call_step("Train", request.message, timeout)), request)

    @operation
    def infer(
        self, x: Any, *, out: np.ndarray | None = None, wire_dtype: Any = None, timeout: float | None = None
    ) -> Plan[np.ndarray]:
        """Inference-mode forward with the running statistics; changes nothing."""
        request = self._forward_request("Infer", x, wire_dtype, out)
        return self._forward_result((yield self._call_step("Infer", request.message, timeout)), request)

    @operation
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
    ) -> Plan[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """``(dx, dweight, dbias)`` of ``sum(forward(x) * dy)``; None for a missing weight or bias.

        ``x=None`` differentiates a kept forward instead: ``forward_id``, or
        the last ``train(..., keep_forward=True)`` of this handle (its x and
        the weight and bias it ran with). FailedPrecondition means the server
        dropped it: call again with x. ``sync``: the same step as the Train's
        (training mode only); dweight and dbias are then this rank's own share.
        """
        request = self._gradient_request(x, dy, training, wire_dtype, forward_id, out, sync)
        response = yield self._call_step("Gradient", request.message, timeout)
        return protocol.gradient_result(response, request, self.info)

    @operation
    def train_statistics(
        self,
        count: int,
        mean: Any,
        m2: Any,
        *,
        sync: protocol.SyncGroup | None = None,
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Plan[protocol.TrainedStatistics]:
        """Statistics mode: a training batch given as its statistics, folded into the running statistics
        as :meth:`train` of the batch would (for layers with running statistics).

        ``count`` values stand behind each group's ``mean`` and ``m2`` (the sum
        of squared deviations from the mean); a group is a channel for batch
        norm, a sample's channel for instance norm. ``parameters`` and ``sync``
        as for :meth:`train`. Returns the statistics to normalize the batch
        with (the whole step's under ``sync``) and the running statistics after.
        """
        request = protocol.train_statistics_request(self.name, count, mean, m2, sync, parameters)
        result = protocol.trained_statistics((yield self._call_step("TrainStatistics", request, timeout)), self.info)
        self.info.version, self.info.num_batches_tracked = result.version, result.num_batches_tracked
        if result.running_mean is not None:
            self.running_stats = {"running_mean": result.running_mean, "running_var": result.running_var}
        return result

    @operation
    def gradient_statistics(
        self, count: int, sum_dy: Any, sum_dy_xmu: Any, *, sync: protocol.SyncGroup, timeout: float | None = None
    ) -> Plan[protocol.StepSums]:
        """Statistics mode, synchronized backward: this rank's per-channel ``sum(dy)`` and
        ``sum(dy * (x - mean))`` (about the step's mean) summed with the other ranks' of the same step."""
        request = protocol.gradient_statistics_request(self.name, count, sum_dy, sum_dy_xmu, sync)
        return protocol.step_sums((yield self._call_step("GradientStatistics", request, timeout)))

    @operation
    def state_dict(self, *, version: int | None = None, timeout: float | None = None) -> Plan[dict[str, np.ndarray]]:
        """The state under PyTorch's keys (``num_batches_tracked`` as an int64 scalar array): the current one,
        or that of a kept ``version`` (NotFound for a version the server no longer keeps)."""
        request = pb.GetStateRequest(name=self.name, version=version)
        return protocol.state_dict((yield self._call_step("GetState", request, timeout)), self.info)

    @operation
    def rollback(self, version: int, *, timeout: float | None = None) -> Plan[pb.Layer]:
        """Make the kept ``version``'s state current again (as a new version; see the client's rollback_layer)."""
        self.info = yield functools.partial(self._client.rollback_layer, self.name, version, timeout=timeout)
        return self.info

    @operation
    def load_state_dict(
        self,
        state: Mapping[str, Any],
        strict: bool = True,
        *,
        expected_version: int | None = None,
        timeout: float | None = None,
    ) -> Plan[pb.Layer]:
        """Replace the state, all or nothing (a torch ``state_dict()`` works as is).

        ``strict=False`` updates only the keys given; ``expected_version``
        makes the update conditional (FailedPrecondition when stale).
        """
        request = protocol.load_state_request(self.name, state, strict, expected_version)
        self.info = yield self._call_step("SetState", request, timeout)
        return self.info

    @operation
    def delete(self, *, timeout: float | None = None) -> Plan[pb.Layer]:
        return (yield functools.partial(self._client.delete_layer, self.name, timeout=timeout))
