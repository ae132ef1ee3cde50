"""Server interceptors: every call guarded and observed, every call but health authenticated.

Interceptors see every service on the server (Normalization, health,
reflection), so what they do holds for all of them. They wrap the method
handler gRPC found rather than the servicer, which keeps the servicer about
the domain alone.

:class:`GuardCalls` is how every call runs. Its rules come from crashes:

* Nothing is read from a call's context after the call ended (gRPC frees the
  call then, and reading it, e.g. ``peer()``, crashed the process). What the
  log needs is taken when the call starts, and a streamed answer is written
  by a coroutine that ends inside the call, not by a generator that gRPC may
  finalize later.
* A request whose bytes do not parse answers INVALID_ARGUMENT, for every
  service: deserializers never raise into gRPC (which answers UNKNOWN and
  logs a traceback).
* A call whose routing header (``x-normserve-layer``, see normserve.v1.routing)
  names another layer than its request (a stream: its head) acts on answers
  INVALID_ARGUMENT before the servicer sees the request: behind a proxy that
  routes by the header, it may have reached a replica that does not own its
  layer. So does a call about a layer that came through the proxy (which marks
  every call it forwards, ``x-normserve-view: cluster``) without the header:
  the proxy sent it to any replica, which would act on (or create) a copy of
  the layer that is not the owner's.
* A stream whose peer sends or takes nothing for ``idle_seconds`` while the
  server waits on it is ended with DEADLINE_EXCEEDED, so it cannot hold a
  concurrency slot and its memory forever. Pending reads and writes are never
  cancelled (gRPC's core still owns their buffers): the call is aborted and
  they complete as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

from normserve.server.logs import shorten
from normserve.server.metrics import Metrics
from normserve.server.security import TokenSet
from normserve.v1.routing import LAYER_HEADER, VIEW_CLUSTER, VIEW_HEADER, layer_of

__all__ = ["GuardCalls", "Malformed", "RequireToken", "same_kind"]

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


def same_kind(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind and serializers whose behavior is ``behavior``."""
    return _KINDS[_kind(handler)](
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Malformed:
    """What a request deserializes to when its bytes are not a valid message."""

    __slots__ = ("nbytes", "reason")

    def __init__(self, reason: str, nbytes: int) -> None:
        self.reason, self.nbytes = reason, nbytes

    def ByteSize(self) -> int:  # noqa: N802 -- sized like a message by the call metrics
        return self.nbytes


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # any parse failure is the sender's: say so, never raise into gRPC
            return Malformed(
                f"malformed request ({len(data)} bytes): {shorten(str(exc) or type(exc).__name__)}", len(data)
            )

    return deserialize


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
    """What one call did, taken while the call runs (never read from its context after it ended)."""

    __slots__ = ("layer", "method", "peer", "proxied", "received", "routed", "sent", "service", "start")

    def __init__(self, full_method: str, context: grpc.aio.ServicerContext) -> None:
        self.service, _, self.method = full_method.lstrip("/").rpartition("/")
        self.start = time.perf_counter()
        self.peer = context.peer()
        self.received = self.sent = 0
        self.layer = ""
        #: The layer the call's routing header names (None without one): what a proxy routed it by.
        metadata = tuple(context.invocation_metadata() or ())
        self.routed = next((value for key, value in metadata if key == LAYER_HEADER), None)
        #: Whether a proxy forwarded the call (it marks every call so, normserve.v1.routing).
        self.proxied = (VIEW_HEADER, VIEW_CLUSTER) in metadata

    def saw_request(self, request: Any) -> None:
        self.received += request.ByteSize()
        if not self.layer:  # a stream names its layer in its first message
            self.layer = layer_of(request) or ""

    def misrouted(self, request: Any) -> str | None:
        """Why ``request`` must be refused when its layer is not the one its routing header names, else None."""
        layer = layer_of(request)
        if layer is None or layer == self.routed:
            return None
        if self.routed is None:
            if not self.proxied:
                return None  # a call made to this server directly: no routing to get wrong
            return (
                f"the call is about layer {shorten(repr(layer), 300)} but came through the proxy without the "
                f"{LAYER_HEADER} header, so the proxy sent it to any replica, which may not own the layer (a "
                "CreateLayer there would make a second copy). Send the layer's name in that header (the Python "
                "clients do)"
            )
        return (
            f"the call's {LAYER_HEADER} header names layer {shorten(repr(self.routed), 300)} but the request is "
            f"about layer {shorten(repr(layer), 300)}; a proxy routes each call by that header, so this one may "
            "have reached a replica that does not own its layer. Send the request's own layer name in the header "
            "(the Python clients do)"
        )


class _GuardedContext:
    """A call's context whose reads and writes end the call when the peer stalls them (see module doc).

    Everything else is the real context's.
    """

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        call: _Call,
        idle_seconds: float,
        ending: Callable[[grpc.StatusCode, str], None],
    ) -> None:
        self._context, self._call, self._idle, self._ending = context, call, idle_seconds, ending
        self._waits: set[object] = set()  # the waits on the peer in progress (a read and a write may overlap)
        self._abort: asyncio.Task | None = None
        self.ended = False  # recorded (metrics, log) already

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        """Record the call's end, then send its status: a client that sees it finds it counted."""
        if not self.ended and not self._context.done():
            self.ended = True
            self._ending(code, details)
        await self._context.abort(code, details, trailing_metadata)

    @contextlib.contextmanager
    def _waiting_on_peer(self, stalled: str) -> Iterator[None]:
        token = object()
        self._waits.add(token)
        timer = asyncio.get_running_loop().call_later(self._idle, self._expire, token, stalled)
        try:
            yield
        finally:
            timer.cancel()
            self._waits.discard(token)

    def _expire(self, token: object, stalled: str) -> None:
        if token in self._waits:
            self._abort = asyncio.ensure_future(self._end(token, stalled))  # held: a task nobody holds may vanish

    async def _end(self, token: object, stalled: str) -> None:
        # Checked again here, where the abort starts: the wait may have ended since the timer fired (then the
        # call goes on), and while it lasts the call is alive. The status may not get out (a peer that takes
        # nothing may not take that either): the connection's age bounds that call.
        if token not in self._waits or self._context.done():
            return
        with contextlib.suppress(grpc.aio.AbortError, grpc.aio.UsageError, grpc.aio.InternalError):
            await self.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the client {stalled} for {self._idle:g} s in the middle of a stream, so the server ended the "
                "call (it waits at most --default-deadline on a stalled peer); keep streams moving or retry",
            )

    async def read(self) -> Any:
        with self._waiting_on_peer("sent nothing"):
            request = await self._context.read()
        return request if request is grpc.aio.EOF else await self.checked(request)

    async def write(self, response: Any) -> None:
        self._call.sent += response.ByteSize()
        with self._waiting_on_peer("took nothing of the answer"):
            await self._context.write(response)

    async def incoming(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A streamed request's messages, checked and counted, each waited for at most the idle time."""
        iterator = requests.__aiter__()
        while True:
            with self._waiting_on_peer("sent nothing"):
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    return
            yield await self.checked(request)

    async def checked(self, request: Any) -> Any:
        """``request``, counted; a Malformed one, or one its routing header does not name, aborts the call with
        INVALID_ARGUMENT (unary calls and every message of a stream come through here)."""
        self._call.saw_request(request)
        problem = request.reason if isinstance(request, Malformed) else self._call.misrouted(request)
        if problem is not None:
            await self.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        return request


class GuardCalls(grpc.aio.ServerInterceptor):
    """Runs every call safely (see the module doc), counts, times and logs it.

    Metrics by method and code; successful calls log at debug level, failed
    ones at warning with the layer, the code and the message the client got.
    ``idle_seconds`` bounds how long a stream may wait on a silent peer;
    ``moved(bytes)`` hears how many bytes each call received and sent.
    """

    def __init__(
        self, metrics: Metrics | None, idle_seconds: float, moved: Callable[[int], None] | None = None
    ) -> None:
        self._metrics = metrics
        self._idle = idle_seconds
        self._moved = moved

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

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, error, response = _Call(method, context), None, None
            guarded = _GuardedContext(context, call, self._idle, functools.partial(self._record, call))
            try:
                if streams_in:
                    request = guarded.incoming(request)
                else:
                    request = await guarded.checked(request)
                result = inner(request, guarded)
                if not streams_out:
                    response = await result
                    call.sent += response.ByteSize()
                    return response
                if inspect.isasyncgen(result):
                    try:
                        async for response in result:
                            await guarded.write(response)
                    finally:
                        await result.aclose()
                else:  # a handler that writes with context.write()
                    await result
                return None
            except grpc.aio.InternalError as exc:
                # gRPC's core refused to send (an answer, a status): the peer went away (cancelled, deadline,
                # connection lost) before gRPC told the call. That is a cancellation, not a server error.
                error = asyncio.CancelledError(f"the client is gone; nothing more could be sent ({exc})")
                raise error from exc
            except BaseException as exc:
                error = exc
                raise
            finally:
                if not guarded.ended:  # ended without an abort: gRPC's status for the call, or what ended it
                    self._record(call, _code(context, error), context.details() or _describe(error))
                request = result = response = guarded = None  # nothing of the call outlives it
                _release(error)

        return same_kind(handler, behavior, _tolerant(handler.request_deserializer))

    def _record(self, call: _Call, code: grpc.StatusCode, details: str) -> None:
        """Count and log an ending call."""
        seconds = time.perf_counter() - call.start
        if self._moved is not None:
            self._moved(call.received + call.sent)
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
            "peer": call.peer,
        }
        if failed:
            fields["details"] = details
            access_log.warning("%s failed: %s", call.method, code.name, extra={"fields": fields})
        else:
            access_log.debug("%s ok", call.method, extra={"fields": fields})


def _release(error: BaseException | None) -> None:
    """Let nothing of a call outlive it through the error that ended it: gRPC keeps that error with the
    call, and its traceback holds the frames of the finished handlers, with their requests and arrays among
    their locals, in reference cycles that only the cyclic garbage collector would free (and large arrays
    do not prompt it to run)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # frames still running (the caller's) are left alone
        error = error.__cause__ or error.__context__


def _describe(error: BaseException | None) -> str:
    return "" if error is None else repr(error)


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The code of a call that ended without our abort. Reads only the Python-side status gRPC keeps."""
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.UNKNOWN if error is not None else grpc.StatusCode.OK
