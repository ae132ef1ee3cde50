"""The server's interceptor: every call guarded and observed, every call but health authenticated.

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
* A unary call is served as a stream of one message: gRPC would wait for a
  unary request's message without any timer (calls that sent only their
  headers stayed forever), so the guard reads it, waiting at most
  ``idle_seconds``. The wire is the same for both.
* A request larger than its method's receive limit (normserve.server.transport:
  small for methods without tensors) is refused before it is parsed.
* ``--max-concurrent-rpcs`` is counted here, not by gRPC, so that health
  checks never wait for a slot: Health/Check takes none, and Health/Watch
  streams have a cap of their own (transport.MAX_WATCH_STREAMS).

The guard also decides on the call's headers alone, before any of its request
is read: a call without a valid token is answered UNAUTHENTICATED (health
checks carry none), and a layer call while the kernels warm up UNAVAILABLE
(:class:`Gate`).
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
from typing import Any, Protocol

import grpc

from normserve.server import phases
from normserve.server.errors import status_details
from normserve.server.logs import shorten
from normserve.server.metrics import Metrics
from normserve.server.security import TokenSet
from normserve.server.transport import MAX_WATCH_STREAMS, receive_limit
from normserve.v1.routing import LAYER_HEADER, VIEW_CLUSTER, VIEW_HEADER, layer_of, layers_of

__all__ = ["CallListener", "CallSlots", "Gate", "GuardCalls", "Malformed", "same_kind"]

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
_HEALTH_WATCH = HEALTH_PREFIX + "Watch"
#: Failures that are a normal answer, not a problem: logged at INFO, not WARNING. NOT_FOUND is how a client
#: probes for a layer before it creates it.
_QUIET_FAILURES = {grpc.StatusCode.NOT_FOUND: logging.INFO}


def _kind(handler: grpc.RpcMethodHandler) -> str:
    return next(kind for kind in _KINDS if getattr(handler, kind) is not None)


def _streamed_request(
    handler: grpc.RpcMethodHandler,
    behavior: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """A handler that answers as ``handler`` does but takes its request as a stream (gRPC then calls
    ``behavior`` as soon as the headers arrive, before any request byte is read)."""
    answers = _kind(handler).split("_")[1]
    return _KINDS[f"stream_{answers}"](
        behavior, request_deserializer=request_deserializer, response_serializer=handler.response_serializer
    )


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


def _refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, reason: str
) -> grpc.RpcMethodHandler:
    """A handler in ``handler``'s place that answers ``code`` without reading anything of the request
    (request-streaming, so gRPC runs it at once: nothing of the request is received, let alone parsed)."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message, status_details(code, message, reason))

    return _streamed_request(handler, refuse, None)


class Malformed:
    """What a request deserializes to when its bytes are not a valid message (or too many to parse)."""

    __slots__ = ("code", "nbytes", "reason")

    def __init__(self, reason: str, nbytes: int, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> None:
        self.reason, self.nbytes, self.code = reason, nbytes, code

    def ByteSize(self) -> int:  # noqa: N802 -- sized like a message by the call metrics
        return self.nbytes


def _tolerant(deserializer: Callable[[bytes], Any] | None, limit: int) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        if len(data) > limit:
            return Malformed(
                f"the request has {len(data)} bytes; this method takes at most {limit} (a request without "
                "tensors is small; tensor requests take up to --max-message-bytes)",
                len(data),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
        try:
            return deserializer(data)
        except Exception as exc:  # any parse failure is the sender's: say so, never raise into gRPC
            return Malformed(
                f"malformed request ({len(data)} bytes): {shorten(str(exc) or type(exc).__name__)}", len(data)
            )

    return deserialize


class CallSlots:
    """Calls in progress: at most ``max_calls`` (None: no limit) besides health, which never waits for a slot
    (Health/Check takes none; Health/Watch streams are capped at ``max_watches`` of their own)."""

    def __init__(self, max_calls: int | None, max_watches: int = MAX_WATCH_STREAMS) -> None:
        self._caps = {"calls": max_calls, "watches": max_watches}
        self._taken = {"calls": 0, "watches": 0}

    @staticmethod
    def _pool(method: str) -> str | None:
        if method == _HEALTH_WATCH:
            return "watches"
        return None if method.startswith(HEALTH_PREFIX) else "calls"

    def take(self, method: str) -> str | None:
        """Take a slot for a call of ``method``: None when taken (or none needed), else why not."""
        pool = self._pool(method)
        if pool is None:
            return None
        cap = self._caps[pool]
        if cap is not None and self._taken[pool] >= cap:
            flag = "--max-concurrent-rpcs" if pool == "calls" else "the server's Health/Watch cap"
            return f"{cap} calls are in progress, as many as {flag} allows; retry shortly"
        self._taken[pool] += 1
        return None

    def give_back(self, method: str) -> None:
        pool = self._pool(method)
        if pool is not None:
            self._taken[pool] -= 1


class CallListener(Protocol):
    """Hears of the calls the guard runs: each one's start, then its end, once each."""

    def started(self) -> None: ...

    def ended(self, nbytes: int) -> None:
        """The call ended, having received and sent ``nbytes``."""


class Gate:
    """Refuses the calls of ``services`` UNAVAILABLE, saying why, until :meth:`ready`; other services (health,
    reflection) pass. The server listens while it warms up, and a client retries UNAVAILABLE."""

    def __init__(self, services: tuple[str, ...], why: str) -> None:
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._why: str | None = why

    def ready(self) -> None:
        self._why = None

    def refuses(self, method: str) -> str | None:
        """Why a call of ``method`` is refused now, else None."""
        why = self._why
        return why if why is not None and method.startswith(self._prefixes) else None


class _Call:
    """What one call did, taken while the call runs (never read from its context after it ended)."""

    __slots__ = ("layer", "method", "peer", "phases", "proxied", "received", "routed", "sent", "service", "start")

    def __init__(self, service: str, method: str, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method = service, method
        self.start = time.perf_counter()
        self.phases = phases.start_call()  # where the call's time goes (the registry fills it in)
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
        layer = next((name for name in layers_of(request) if name != self.routed), None)
        if layer is None:
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
    def _waiting_on_peer(self, stalled: str = "sent nothing in the middle of a stream") -> Iterator[None]:
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
                f"the client {stalled} for {self._idle:g} s, so the server ended the call (it waits at most "
                "--default-deadline on a stalled peer); keep streams moving or retry",
            )

    async def read(self) -> Any:
        with self._waiting_on_peer():
            request = await self._context.read()
        return request if request is grpc.aio.EOF else await self.checked(request)

    async def only_message(self) -> Any:
        """The request of a unary call served as a stream: its one message, waited for at most the idle time."""
        with self._waiting_on_peer("sent its call's headers but not its request message"):
            request = await self._context.read()
        if request is grpc.aio.EOF:
            await self.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended without its request message")
        return await self.checked(request)

    async def write(self, response: Any) -> None:
        self._call.sent += response.ByteSize()
        with self._waiting_on_peer("took nothing of the answer in the middle of a stream"):
            await self._context.write(response)

    async def incoming(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """A streamed request's messages, checked and counted, each waited for at most the idle time."""
        iterator = requests.__aiter__()
        while True:
            with self._waiting_on_peer():
                try:
                    request = await iterator.__anext__()
                except StopAsyncIteration:
                    return
            yield await self.checked(request)

    async def checked(self, request: Any) -> Any:
        """``request``, counted; a Malformed one, or one its routing header does not name, aborts the call with
        INVALID_ARGUMENT (unary calls and every message of a stream come through here)."""
        self._call.saw_request(request)
        if isinstance(request, Malformed):
            await self.abort(request.code, request.reason, status_details(request.code, request.reason, "MALFORMED"))
        problem = self._call.misrouted(request)
        if problem is not None:
            code = grpc.StatusCode.INVALID_ARGUMENT
            await self.abort(code, problem, status_details(code, problem, "MISROUTED"))
        return request


class GuardCalls(grpc.aio.ServerInterceptor):
    """Runs every call safely (see the module doc), counts, times and logs it.

    Metrics by method and code; successful calls log at debug level, failed
    ones at warning (NOT_FOUND: info) with the layer, the code and the message the client got.
    ``idle_seconds`` bounds how long a call may wait on a silent peer;
    ``listener`` hears of each call's start and end (with the bytes it received and sent), health checks
    excepted (a load balancer's every second would never let the server look quiet);
    ``slots`` bounds the calls in progress; a request larger than
    :func:`normserve.server.transport.receive_limit` is refused unparsed.
    ``tokens`` (None: no authentication) and ``gate`` refuse calls before any of
    their request is read: UNAUTHENTICATED without a valid token (health excepted),
    then UNAVAILABLE while the gate is closed. They are checks of this interceptor,
    not interceptors of their own: each interceptor is a coroutine more on every call.
    """

    def __init__(
        self,
        metrics: Metrics | None,
        idle_seconds: float,
        listener: CallListener | None = None,
        *,
        max_message_bytes: int = (1 << 31) - 1,
        slots: CallSlots | None = None,
        tokens: TokenSet | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._metrics = metrics
        self._idle = idle_seconds
        self._listener = listener
        self._max_message_bytes = max_message_bytes
        self._slots = slots or CallSlots(None)
        self._tokens = tokens
        self._gate = gate
        #: Each method's guarded handler, with the handler it guards: built once, not per call.
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        refusal = self._refusal(method, details)
        if refusal is not None:
            return self._guard(method, _refusing(handler, *refusal))
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        guarded = self._guard(method, handler)
        self._guarded[method] = (handler, guarded)  # one entry per method a generic handler knows
        return guarded

    def _refusal(self, method: str, details: Any) -> tuple[grpc.StatusCode, str, str] | None:
        """Why a call is refused on its headers alone (code, message, reason), else None."""
        if self._tokens is not None and not method.startswith(HEALTH_PREFIX):
            problem = self._tokens.problem(dict(details.invocation_metadata or ()).get("authorization"))
            if problem is not None:
                return grpc.StatusCode.UNAUTHENTICATED, problem, "UNAUTHENTICATED"
        why = None if self._gate is None else self._gate.refuses(method)
        if why is not None:
            return grpc.StatusCode.UNAVAILABLE, why, "WARMING_UP"
        return None

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` run as the module doc says: a request-streaming handler gRPC calls at once."""
        kind = _kind(handler)
        inner = getattr(handler, kind)
        streams_in, streams_out = kind.startswith("stream"), kind.endswith("stream")
        service, _, name = method.lstrip("/").rpartition("/")
        listener = None if method.startswith(HEALTH_PREFIX) else self._listener

        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, error, response, result = _Call(service, name, context), None, None, None
            if self._metrics is not None:
                self._metrics.begin(call.service, call.method)
            guarded = _GuardedContext(context, call, self._idle, functools.partial(self._record, call, listener))
            refused = self._slots.take(method)
            if listener is not None:
                listener.started()  # ended by _record, once, however the call ends
            try:
                if refused is not None:
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                    await guarded.abort(code, refused, status_details(code, refused, "TOO_MANY_CALLS"))
                if streams_in:
                    request = guarded.incoming(request)
                else:
                    request = await guarded.only_message()
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
                if refused is None:
                    self._slots.give_back(method)
                if not guarded.ended:  # ended without an abort: gRPC's status for the call, or what ended it
                    self._record(call, listener, _code(context, error), context.details() or _describe(error))
                request = result = response = guarded = None  # nothing of the call outlives it
                _release(error)

        limit = receive_limit(method, self._max_message_bytes)
        return _streamed_request(handler, behavior, _tolerant(handler.request_deserializer, limit))

    def _record(self, call: _Call, listener: CallListener | None, code: grpc.StatusCode, details: str) -> None:
        """Count and log an ending call (and tell ``listener``, which heard of its start)."""
        seconds = time.perf_counter() - call.start
        if listener is not None:
            listener.ended(call.received + call.sent)
        if self._metrics is not None:
            self._metrics.observe(call.service, call.method, code.name, seconds, call.received, call.sent, call.phases)
        failed = code != grpc.StatusCode.OK
        level = _QUIET_FAILURES.get(code, logging.WARNING) if failed else logging.DEBUG
        if not access_log.isEnabledFor(level):
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
            access_log.log(level, "%s failed: %s", call.method, code.name, extra={"fields": fields})
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
