"""Server interceptors: every call observed (metrics, access log), every call but health authenticated.

Interceptors see every service on the server (Normalization, health,
reflection), so what they do holds for all of them. They wrap the method
handler gRPC found rather than the servicer, which keeps the servicer about
the domain alone.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from normserve.server.metrics import Metrics
from normserve.server.security import TokenSet

__all__ = ["ObserveCalls", "RequireToken", "same_kind"]

access_log = logging.getLogger("normserve.access")

_KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
#: Health checks are exempt from authentication: load balancers and container
#: health checks carry no token.
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return next(kind for kind in _KINDS if getattr(handler, kind) is not None)


def same_kind(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind and serializers whose behavior is ``behavior``."""
    return _KINDS[_kind(handler)](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class RequireToken(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call carries ``authorization: Bearer <token>`` with a known token."""

    def __init__(self, tokens: TokenSet) -> None:
        self._tokens = tokens

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        problem = self._tokens.problem(dict(details.invocation_metadata or ()).get("authorization"))
        if problem is None:
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return same_kind(handler, deny)


class _Call:
    """What one call did, recorded when it ends."""

    __slots__ = ("context", "layer", "method", "received", "sent", "service", "start")

    def __init__(self, full_method: str, context: grpc.aio.ServicerContext) -> None:
        self.service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.context = context
        self.start = time.perf_counter()
        self.received = self.sent = 0
        self.layer = ""

    def saw_request(self, request: Any) -> None:
        self.received += request.ByteSize()
        if not self.layer:  # Train/Infer/Gradient name it `layer`, the others `name`
            self.layer = getattr(request, "layer", "") or getattr(request, "name", "")

    def code(self, error: BaseException | None) -> grpc.StatusCode:
        if isinstance(error, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        code = self.context.code()
        if code is not None:
            return code
        return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK


class ObserveCalls(grpc.aio.ServerInterceptor):
    """Counts, times and logs every call: metrics by method and code, a log line per call.

    Successful calls log at debug level; failed ones at warning with the
    layer, the code and the message the client got.
    """

    def __init__(self, metrics: Metrics | None) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        kind = _kind(handler)
        inner = getattr(handler, kind)
        streams_in, streams_out = kind.startswith("stream"), kind.endswith("stream")
        method = details.method

        def requests(call: _Call, request: Any) -> Any:
            if not streams_in:
                call.saw_request(request)
                return request
            return _counted(request, call)

        if streams_out:

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call, error = _Call(method, context), None
                try:
                    result = inner(requests(call, request), context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            call.sent += response.ByteSize()
                            yield response
                    else:  # a handler that writes with context.write()
                        await result
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._record(call, error)

        else:

            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call, error = _Call(method, context), None
                try:
                    response = await inner(requests(call, request), context)
                    call.sent += response.ByteSize()
                    return response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    self._record(call, error)

        return same_kind(handler, behavior)

    def _record(self, call: _Call, error: BaseException | None) -> None:
        seconds = time.perf_counter() - call.start
        code = call.code(error)
        if self._metrics is not None:
            self._metrics.observe(call.service, call.method, code.name, seconds, call.received, call.sent)
        failed = code != grpc.StatusCode.OK
        if not access_log.isEnabledFor(logging.WARNING if failed else logging.DEBUG):
            return  # the usual case of a successful call: no log line to build
        fields = {
            "method": call.method,
            "layer": call.layer,
            "code": code.name,
            "ms": round(seconds * 1e3, 3),
            "bytes_in": call.received,
            "bytes_out": call.sent,
            "peer": call.context.peer(),
        }
        if failed:
            fields["details"] = call.context.details() or (repr(error) if error is not None else "")
            access_log.warning("%s failed: %s", call.method, code.name, extra={"fields": fields})
        else:
            access_log.debug("%s ok", call.method, extra={"fields": fields})


async def _counted(requests: AsyncIterator[Any], call: _Call) -> AsyncIterator[Any]:
    async for request in requests:
        call.saw_request(request)
        yield request
