"""Statistics mode's training updates, off the training step's critical path.

A training forward in statistics mode normalizes with its batch's own
statistics, so it needs nothing back from the server: it hands its update
(the batch's count, per-group means and m2, changed parameters) to its
client's :class:`StatisticsPipeline` and goes on. The pipeline sends every
update queued since its last message together, in one PushStatistics
message on a long-lived stream (the server stores a message in one
transaction), and reads the answers as they come. A step's cost over local
torch is then encoding its updates, not a round trip per layer.

What it keeps of the blocking call it replaces:

* **Acknowledged means stored.** An update is done only when its answer
  says so; the answer carries the layer's running statistics after it.
* **Never silent.** A refused update (a NaN batch, a deleted layer, a full
  disk: its layer is unchanged by it), or one whose answer never came (the
  stream broke: the server was killed, the network went), is recorded in its
  module's :class:`UpdateLog`, which the module raises at its next
  interaction (forward, state read, flush), naming the steps. Updates still
  unanswered when the process exits are waited for, and failures reported.
* **Bounded.** At most ``max_in_flight`` updates (and ``max_in_flight_bytes``
  of them) are queued or sent and not yet answered; a forward past that waits
  for answers (backpressure), up to the client's timeout.
* **Ordered.** One stream carries a client's updates in order, and the
  server applies a message's updates in order.

Routing: a server reached directly takes every layer on one stream. Behind a
proxy in front of layer-sharded replicas (:mod:`normserve.v1.routing`) a
stream must name its one layer in the routing header: the server refuses the
first message as MISROUTED before applying anything, and the pipeline then
keeps one stream per layer, resending what was refused.

A stream idle for ``idle_seconds`` is closed by the client (the server
would end a silent stream after its --default-deadline); the next update
opens a new one.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from normserve.client import protocol
from normserve.client.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    MalformedAnswer,
    NormServeError,
    Unavailable,
    error_from_rpc,
    error_from_status,
)
from normserve.v1 import normalization_pb2 as pb
from normserve.v1 import routing

__all__ = ["StatisticsPipeline", "UpdateLog"]

METHOD = "PushStatistics"
#: Updates per message (the server's MAX_UPDATES_PER_MESSAGE is larger), and bytes past which a message
#: takes no more (a few MiB: well inside any --max-message-bytes a server sets for a training job).
MAX_UPDATES_PER_MESSAGE = 1024
MESSAGE_BYTES = 4 << 20
#: Seconds the process waits at exit for updates still unanswered (per pipeline), besides the client's timeout.
EXIT_PATIENCE = 30.0


class UpdateLog:
    """One module's updates: how many are in flight, the last stored outcome, and the failures not yet
    raised. Written by the pipeline's threads under its lock; read by the module."""

    def __init__(self, layer: pb.Layer) -> None:
        self.layer = layer
        self.in_flight = 0
        #: The latest stored update's running statistics after it and count of batches, until taken.
        self.stored: Stored | None = None
        self._failures: list[tuple[int, NormServeError]] = []

    @property
    def failed(self) -> bool:
        return bool(self._failures)

    def _fail(self, step: int, error: NormServeError) -> None:
        self._failures.append((step, error))

    def take_failure(self) -> NormServeError | None:
        """The failures recorded since the last call, as one error naming their steps (its class is the
        first failure's); None when there were none."""
        failures, self._failures = self._failures, []
        if not failures:
            return None
        first = failures[0][1]
        steps = tuple(step for step, _ in failures)
        unanswered = isinstance(first, _Unanswered)
        what = "were not acknowledged" if unanswered else "were refused"
        consequence = (
            "the server may have stored none, some or all of them (restart it, then read the layer's state or "
            "resume from a checkpoint)"
            if unanswered
            else "each refused update changed nothing on the server; the module's running statistics are the "
            "server's again"
        )
        error = type(first)(
            f"statistics-mode update(s) of layer {self.layer.name!r} at training step(s) {_ranges(steps)} {what}: "
            f"{first.details}; {consequence}",
            code=first.code,
            method=METHOD,
            reason=first.reason,
        )
        error.steps, error.layer = steps, self.layer.name
        return error


class _Unanswered:
    """Marks an update's failure as a missing answer (unknown whether stored), not a refusal."""


class UpdatesUnavailable(_Unanswered, Unavailable):
    """The stream carrying the updates broke before their answers came."""


class UpdatesMalformed(_Unanswered, MalformedAnswer):
    """The server's answer to the updates did not fit them."""


@dataclass
class _Update:
    log: UpdateLog
    step: int
    message: pb.StatisticsUpdate
    nbytes: int
    queued_at: float


class _Stream:
    """One PushStatistics call: the updates queued for it, and those sent and not yet answered."""

    def __init__(self, pipeline: StatisticsPipeline, route: str | None) -> None:
        self.pipeline, self.route = pipeline, route
        self.queued: collections.deque[_Update] = collections.deque()
        self.sent: collections.deque[tuple[int, list[_Update]]] = collections.deque()
        self.closing = False  # takes no more updates (the pipeline opens another stream for the next)
        self.answered = False  # an answer came: the server took the stream (no MISROUTED refusal can follow)
        self.call: Any = None  # the gRPC call, once opened
        self._wake = threading.Condition(pipeline.lock)
        name = f"normserve-statistics-{route or 'all'}"[:60]
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, update: _Update) -> None:
        self.queued.append(update)
        if len(self.queued) == 1 or len(self.queued) >= MAX_UPDATES_PER_MESSAGE:
            self._wake.notify()

    def close(self) -> None:
        self.closing = True
        self._wake.notify()

    def wake(self) -> None:
        self._wake.notify()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _messages(self) -> Iterator[pb.PushStatisticsRequest]:
        """The stream's requests (gRPC pulls them on a thread of its own); ends when closed or idle.

        Each message costs both sides about the same CPU whatever it holds, and on a trainer's machine
        that CPU is the step's: so one message is in flight at a time, and an update lingers up to
        ``linger_seconds`` for others to join it, unless someone waits for it (a state read, a full
        window) or a message's worth is queued.
        """
        sequence = 0
        while True:
            with self._wake:
                idle_since = time.monotonic()
                while True:
                    now = time.monotonic()
                    if self.queued and not self.sent:
                        due = self.queued[0].queued_at + self.pipeline.linger_seconds
                        if self.closing or self.pipeline.hurried or len(self.queued) >= MAX_UPDATES_PER_MESSAGE:
                            break
                        if now >= due:
                            break
                        self._wake.wait(due - now)
                    elif self.closing and not self.sent:
                        return
                    elif not self.queued and not self.sent and now - idle_since >= self.pipeline.idle_seconds:
                        self.closing = True  # the next update opens another stream
                        return
                    else:  # an answer, or the first update, is awaited
                        self._wake.wait(max(0.05, self.pipeline.idle_seconds - (now - idle_since)))
                batch, nbytes = [self.queued.popleft()], 0
                while self.queued and len(batch) < MAX_UPDATES_PER_MESSAGE and nbytes < MESSAGE_BYTES:
                    nbytes += self.queued[0].nbytes
                    batch.append(self.queued.popleft())
                sequence += 1
                self.sent.append((sequence, batch))
            yield pb.PushStatisticsRequest(sequence=sequence, updates=[update.message for update in batch])

    def _run(self) -> None:
        """Open the call and read its answers until it ends; then hand what is left to the pipeline."""
        error: NormServeError | None = None
        call = None
        try:
            call = self.call = self.pipeline.rpc(self._messages(), metadata=self.pipeline.metadata(self.route))
            for response in call:
                self.pipeline.answered(self, response)
        except grpc.RpcError as exc:
            error = error_from_rpc(exc, METHOD)
        except MalformedAnswer as exc:
            error = exc
            if call is not None:
                call.cancel()
        except Exception as exc:  # a bug here must not lose updates silently
            error = UpdatesUnavailable(f"the client's statistics stream failed ({exc!r})", method=METHOD)
            if call is not None:
                call.cancel()
        self.pipeline.ended(self, error)


def _ranges(steps: tuple[int, ...]) -> str:
    """``(3, 4, 5, 9)`` -> ``"3-5, 9"`` (at most ten ranges shown)."""
    ranges: list[list[int]] = []
    for step in sorted(steps):
        if ranges and step == ranges[-1][1] + 1:
            ranges[-1][1] = step
        else:
            ranges.append([step, step])
    shown = [f"{a}-{b}" if b > a else str(a) for a, b in ranges[:10]]
    return ", ".join(shown) + (f" and {len(ranges) - 10} more ranges" if len(ranges) > 10 else "")


_PIPELINES: weakref.WeakSet[StatisticsPipeline] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    """Updates still in flight when the interpreter exits are waited for; failures are reported, not lost."""
    for pipeline in list(_PIPELINES):
        try:
            pipeline.close(timeout=EXIT_PATIENCE)
        except Exception as error:  # a failure no module raised yet, or updates never answered in time
            print(f"normserve: at exit: {error}", file=sys.stderr)
        for log in pipeline.logs():  # what failed besides (the calls ended unanswered, say)
            failure = log.take_failure()
            if failure is not None:
                print(f"normserve: at exit: {failure}", file=sys.stderr)


class StatisticsPipeline:
    """A blocking client's statistics-mode updates in flight (see the module docstring): one per client,
    made on first use by the client (``NormClient._statistics_pipeline``)."""

    def __init__(
        self,
        client: Any,
        *,
        max_in_flight: int = 4096,
        max_in_flight_bytes: int = 64 << 20,
        idle_seconds: float = 10.0,
        linger_seconds: float = 0.05,
    ) -> None:
        self.client = client
        self.max_in_flight, self.max_in_flight_bytes = max_in_flight, max_in_flight_bytes
        self.idle_seconds, self.linger_seconds = idle_seconds, linger_seconds
        self._waiting = 0  # threads waiting for answers: what is queued goes at once
        self.lock = threading.Lock()
        self._changed = threading.Condition(self.lock)
        self._streams: dict[str | None, _Stream] = {}
        self._ended: list[_Stream] = []
        self._logs: weakref.WeakSet[UpdateLog] = weakref.WeakSet()
        self._per_layer = False  # set once a proxy refused a stream over many layers
        self._in_flight = self._in_flight_bytes = 0
        self._closed = False
        self.rpc = client._rpc(METHOD)
        _PIPELINES.add(self)

    def metadata(self, route: str | None) -> tuple[tuple[str, str], ...]:
        header = () if route is None else ((routing.LAYER_HEADER, route),)
        return (*self.client._metadata, *header)

    @property
    def hurried(self) -> bool:
        """Whether someone waits for answers (then nothing lingers)."""
        return self._waiting > 0

    @contextlib.contextmanager
    def _hurrying(self) -> Iterator[None]:
        """While inside (with the lock held but for the waits), every stream sends what it has at once."""
        self._waiting += 1
        for stream in self._streams.values():
            stream.wake()
        try:
            yield
        finally:
            self._waiting -= 1

    @property
    def in_flight(self) -> int:
        """Updates queued or sent and not yet answered."""
        return self._in_flight

    def logs(self) -> list[UpdateLog]:
        with self.lock:
            return list(self._logs)

    # ------------------------------------------------------------------ the module's side
    def push(
        self,
        log: UpdateLog,
        step: int,
        count: int,
        mean: Any,
        m2: Any,
        parameters: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Queue one training step's update of ``log``'s layer; returns once it is queued (it waits only
        while the window is full: DeadlineExceeded after ``timeout``, default the client's, with nothing
        queued)."""
        message = protocol.statistics_update(log.layer.name, step, count, mean, m2, parameters)
        update = _Update(log, step, message, message.ByteSize(), time.monotonic())
        with self._changed:
            if self._closed:
                raise FailedPrecondition("the client is closed: its statistics-mode updates cannot be sent")
            room = self._has_room(update.nbytes)
            if room():
                full = True
            else:
                with self._hurrying():
                    full = self._changed.wait_for(room, self._patience(timeout))
            if not full:
                raise DeadlineExceeded(
                    f"step {step} of layer {log.layer.name!r} waited {self._patience(timeout)} s for the server to "
                    f"acknowledge {self._in_flight} earlier updates; this one was not sent. Is the server busy "
                    "or stopped? Give the client a longer timeout, or check the server",
                    method=METHOD,
                )
            self._logs.add(log)
            self._in_flight += 1
            self._in_flight_bytes += update.nbytes
            log.in_flight += 1
            self._stream_for(log).add(update)

    def wait(self, log: UpdateLog | None = None, timeout: float | None = None) -> None:
        """Until no update of ``log`` (None: of any module) is in flight; DeadlineExceeded after ``timeout``
        (default the client's), the updates staying in flight."""
        with self._changed, self._hurrying():
            done = self._changed.wait_for(
                lambda: (self._in_flight if log is None else log.in_flight) == 0, self._patience(timeout)
            )
            if not done:
                waiting = self._in_flight if log is None else log.in_flight
                raise DeadlineExceeded(
                    f"waited {self._patience(timeout)} s for the server to acknowledge {waiting} statistics-mode "
                    "update(s); they are still in flight. Is the server busy or stopped?",
                    method=METHOD,
                )

    def close(self, timeout: float | None = None) -> None:
        """Wait for what is in flight (as :meth:`wait`), end the streams, and raise the first failure no
        module raised yet (closing a client never hides one). Once closed, a no-op."""
        if self._closed:
            return
        try:
            self.wait(timeout=timeout)
            self.raise_unreported()
        finally:
            with self._changed:
                self._closed = True
                streams = [*self._streams.values(), *self._ended]
                for stream in self._streams.values():
                    stream.close()
                    if self._in_flight and stream.call is not None:  # gave up waiting: end the calls now
                        stream.call.cancel()
            for stream in streams:
                stream.join(timeout=5.0)
            _PIPELINES.discard(self)

    def raise_unreported(self) -> None:
        """Raise the first failure no module has raised yet (closing a client never hides one)."""
        for log in self.logs():
            error = log.take_failure()
            if error is not None:
                raise error

    def _patience(self, timeout: float | None) -> float | None:
        return self.client.timeout if timeout is None else timeout

    def _has_room(self, nbytes: int) -> Any:
        def room() -> bool:
            if self._in_flight == 0:  # one update always fits, however large
                return True
            return self._in_flight < self.max_in_flight and self._in_flight_bytes + nbytes <= self.max_in_flight_bytes

        return room

    def _stream_for(self, log: UpdateLog) -> _Stream:
        route = log.layer.name if self._per_layer else None
        stream = self._streams.get(route)
        if stream is None or stream.closing:
            stream = self._streams[route] = _Stream(self, route)
        return stream

    # ------------------------------------------------------------------ the streams' side
    def answered(self, stream: _Stream, response: pb.PushStatisticsResponse) -> None:
        """One answer: each update's outcome recorded in its log (stored, with the running statistics after
        it, or why it was refused). An answer that does not fit the message it answers is refused whole
        (MalformedAnswer) before anything of it is used."""
        with self._changed:
            if not stream.sent:
                raise MalformedAnswer(f"the server answered message {response.sequence}, never sent", method=METHOD)
            sequence, batch = stream.sent[0]
            if response.sequence != sequence or len(response.outcomes) != len(batch):
                raise MalformedAnswer(
                    f"the server answered message {response.sequence} with {len(response.outcomes)} outcomes; "
                    f"message {sequence} with {len(batch)} updates was next",
                    method=METHOD,
                )
            results = [_result(update, outcome) for update, outcome in zip(batch, response.outcomes, strict=True)]
            stream.sent.popleft()
            stream.answered = True
            stream.wake()  # the next message may go
            for update, result in zip(batch, results, strict=True):
                if isinstance(result, NormServeError):
                    update.log._fail(update.step, result)
                else:
                    update.log.stored = result
                self._settle(update)
            self._changed.notify_all()

    def ended(self, stream: _Stream, error: NormServeError | None) -> None:
        """A stream's call ended: what it left unanswered is resent (a proxy's MISROUTED refusal of a
        stream over many layers, which applied nothing) or failed in its logs."""
        with self._changed:
            if self._streams.get(stream.route) is stream:
                del self._streams[stream.route]
            self._ended = [s for s in self._ended if s._thread.is_alive()] + [stream]
            stream.close()  # its request generator, if gRPC still holds it, ends
            left = [update for _, batch in stream.sent for update in batch] + list(stream.queued)
            stream.sent.clear(), stream.queued.clear()
            refused_whole = error is not None and error.reason == "MISROUTED" and not stream.answered
            if left and refused_whole and stream.route is None:
                self._per_layer = True
                for update in left:
                    self._stream_for(update.log).add(update)
                return
            if left:
                failure = self._unanswered(error)
                for update in left:
                    update.log._fail(update.step, failure)
                    self._settle(update)
            self._changed.notify_all()

    def _unanswered(self, error: NormServeError | None) -> NormServeError:
        if error is None:
            return UpdatesUnavailable("the server ended the stream before answering them", method=METHOD)
        if isinstance(error, MalformedAnswer):
            return UpdatesMalformed(error.details, method=METHOD)
        return UpdatesUnavailable(
            f"the stream to the server broke before their answers came ({error.code.name}: {error.details})",
            method=METHOD,
            reason=error.reason,
        )

    def _settle(self, update: _Update) -> None:
        update.log.in_flight -= 1
        self._in_flight -= 1
        self._in_flight_bytes -= update.nbytes


def _status_code(value: int) -> grpc.StatusCode:
    """The StatusCode of an outcome's number (UNKNOWN for a number that is none)."""
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


#: A stored update's running statistics after it (checked against its layer), and its count of batches.
Stored = tuple[dict[str, np.ndarray], int]


def _result(update: _Update, outcome: pb.StatisticsOutcome) -> Stored | NormServeError:
    """What an outcome says of ``update``: stored (its running statistics checked against the layer), or
    the error that refused it; MalformedAnswer for an outcome that does not fit the layer."""
    if outcome.code != 0:
        code, details = _status_code(outcome.code), outcome.message[:4096]
        return error_from_status(code, details, METHOD, outcome.reason[:256])
    tensors = {key: getattr(outcome, key) for key in ("running_mean", "running_var")}
    with protocol.reading_answer(METHOD):
        return protocol.running_stats(tensors, update.log.layer), outcome.num_batches_tracked


def running_after(log: UpdateLog) -> Stored | None:
    """The running statistics and count of batches after ``log``'s latest stored update (taken: None the
    next time until another is stored)."""
    stored, log.stored = log.stored, None
    return stored
