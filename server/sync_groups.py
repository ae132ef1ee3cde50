"""Synchronized steps: the calls of several ranks that must meet before any of them goes on.

A synchronized Train or Gradient (a :class:`SyncSpec` on the request) is one
rank's part of a step of a sync group, as in torch.nn.SyncBatchNorm. Each
rank reduces its batch first, then :meth:`SyncSteps.join` holds its part
until every rank of ``(layer, group, step, phase)`` has arrived; the last to
arrive runs the step's ``finish`` once (combine the parts, update the layer),
and every rank gets its result.

Failure is all or nothing: a rank that does not arrive within ``timeout``
seconds of the first fails the step for everyone with DEADLINE_EXCEEDED; a
rank that fails (bad input) or gives up (its deadline, a cancelled call)
fails it for the others with ABORTED. ``finish`` never runs for a failed
step, so a failed step changes no state. Finished and failed steps are
remembered (the most recent ones), so a late or repeated rank gets a clear
answer instead of waiting alone.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from normserve.server.errors import InvalidRequest, ServiceError

__all__ = ["SyncAborted", "SyncSpec", "SyncSteps", "SyncTimeout"]

T = TypeVar("T")
_GROUP_ID = re.compile(r"[A-Za-z0-9_.:/-]{1,256}")
#: Finished and failed steps remembered with why they closed (for a late or repeated rank's answer).
REMEMBERED_STEPS = 4096
#: (layer, group, phase) whose last closed step is remembered, least recently used out.
REMEMBERED_GROUPS = 16384
#: Missing ranks a timeout names (it counts the rest).
NAMED_RANKS = 8


class SyncAborted(ServiceError):
    """Another rank of the step failed or gave up."""

    code = grpc.StatusCode.ABORTED


class SyncTimeout(ServiceError):
    """Not every rank of the step arrived in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass(frozen=True)
class SyncSpec:
    """One rank's place in a synchronized step (the wire's SyncGroup, checked)."""

    group: str
    world_size: int
    rank: int
    step: int

    def __post_init__(self) -> None:
        if not _GROUP_ID.fullmatch(self.group):
            raise InvalidRequest(f"sync.id {self.group[:64]!r} must match [A-Za-z0-9_.:/-]{{1,256}}")
        if self.world_size < 1:
            raise InvalidRequest("sync.world_size must be at least 1 (the number of workers in the group)")
        if not 0 <= self.rank < self.world_size:
            raise InvalidRequest(f"sync.rank {self.rank} must be in [0, world_size) = [0, {self.world_size})")


@dataclass
class _Step:
    world_size: int
    timer: asyncio.TimerHandle | None = None
    parts: dict[int, Any] = field(default_factory=dict)
    complete: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SyncSteps:
    """The open synchronized steps of one server; ``timeout``: seconds the first rank waits for the last."""

    def __init__(self, timeout: float, max_world_size: int = 1024) -> None:
        self.timeout = timeout
        self.max_world_size = max_world_size
        self._open: dict[tuple, _Step] = {}
        self._closed: OrderedDict[tuple, ServiceError] = OrderedDict()  # why a step can no longer be joined
        self._last_closed: OrderedDict[tuple, int] = OrderedDict()  # (layer, group, phase) -> its last closed step

    @staticmethod
    def _group(key: tuple) -> tuple:
        layer, group, _, phase = key
        return layer, group, phase

    @staticmethod
    def _describe(key: tuple) -> str:
        layer, group, step, phase = key
        return f"{phase} step {step} of sync group {group!r} on layer {layer!r}"

    def check(self, key: tuple, spec: SyncSpec) -> None:
        """Refuse (alone, failing no one else) a rank that cannot join ``key``: closed, world size, rank twice."""
        if spec.world_size > self.max_world_size:
            raise InvalidRequest(
                f"sync.world_size {spec.world_size} is over the server's limit of {self.max_world_size} ranks "
                "(--max-world-size)"
            )
        closed = self._closed.get(key)
        if closed is not None:
            raise type(closed)(str(closed))
        step = self._open.get(key)
        if step is None:
            last = self._last_closed.get(self._group(key))
            if last is not None and key[2] <= last:
                raise InvalidRequest(
                    f"the {self._describe(key)} cannot start: step {last} of the group has closed already, and "
                    f"steps only move forward; use a step number above {last}"
                )
            return
        if step.world_size != spec.world_size:
            raise InvalidRequest(
                f"sync.world_size {spec.world_size} differs from the {step.world_size} the other ranks of the "
                f"{self._describe(key)} gave; every rank must give the same"
            )
        if spec.rank in step.parts:
            raise InvalidRequest(
                f"rank {spec.rank} already joined the {self._describe(key)}; each rank joins a step once "
                "(a new step needs a new sync.step)"
            )

    async def join(
        self,
        key: tuple,
        spec: SyncSpec,
        part: Any,
        finish: Callable[[list[Any]], Awaitable[T]],
        deadline: Callable[[Awaitable[Any]], Awaitable[Any]],
    ) -> T:
        """Add this rank's ``part``; once all are in, the result of ``finish(parts in rank order)``.

        ``deadline`` wraps this rank's wait (its call's deadline); giving up
        before the step is complete fails it for everyone.
        """
        self.check(key, spec)
        step = self._open.get(key)
        if step is None:
            step = self._open[key] = _Step(spec.world_size)
            step.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, key)
        step.parts[spec.rank] = part
        if len(step.parts) == step.world_size:
            self._close(key, InvalidRequest(f"the {self._describe(key)} has finished; use the next step number"))
            task = asyncio.ensure_future(finish([step.parts[rank] for rank in range(step.world_size)]))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody awaits
            step.complete.set_result(task)
        try:
            task = await deadline(asyncio.shield(step.complete))
        except BaseException as exc:
            if not step.complete.done():
                reason = "its call's deadline passed" if isinstance(exc, ServiceError) else "its call was cancelled"
                self.fail(key, f"rank {spec.rank} gave up waiting ({reason})")
            raise
        # Once finishing has started it runs to the end; every rank waits for its result.
        return await asyncio.shield(task)

    def fail(self, key: tuple, reason: str, error: type[ServiceError] = SyncAborted) -> None:
        """Fail step ``key`` (open or not yet opened) for every rank, with ``reason``.

        A step already finished or failed keeps its outcome.
        """
        if key in self._closed:
            return
        failure = error(
            f"the {self._describe(key)} failed, nothing was changed: {reason}; "
            "start the next step (a new sync.step) on every rank"
        )
        step = self._open.get(key)
        self._close(key, failure)
        if step is not None and not step.complete.done():
            step.complete.set_exception(failure)
            step.complete.exception()  # retrieved: no "never retrieved" warning when no rank waits

    def _expire(self, key: tuple) -> None:
        step = self._open.get(key)
        if step is None:
            return
        count = step.world_size - len(step.parts)
        named = list(itertools.islice((r for r in range(step.world_size) if r not in step.parts), NAMED_RANKS))
        ranks = ", ".join(map(str, named)) + (", ..." if count > len(named) else "")
        self.fail(
            key,
            f"rank(s) {ranks} ({count} of {step.world_size}) did not arrive within {self.timeout:g} s "
            "(the server's --sync-timeout)",
            SyncTimeout,
        )

    def forget_layer(self, layer: str) -> None:
        """A deleted layer: its open steps fail (ABORTED) for their waiting ranks, and what is remembered
        of its steps is dropped, so a new layer of that name starts afresh."""
        for key in [key for key in self._open if key[0] == layer]:
            self.fail(key, "the layer was deleted")
        for memory in (self._closed, self._last_closed):
            for key in [key for key in memory if key[0] == layer]:
                del memory[key]

    def _close(self, key: tuple, why: ServiceError) -> None:
        step = self._open.pop(key, None)
        if step is not None and step.timer is not None:
            step.timer.cancel()
        self._closed[key] = why
        self._closed.move_to_end(key)
        while len(self._closed) > REMEMBERED_STEPS:
            self._closed.popitem(last=False)
        if step is None:
            return  # a step failed before any rank joined it (one was refused): later steps stay open to all
        group = self._group(key)
        self._last_closed[group] = max(key[2], self._last_closed.get(group, key[2]))
        self._last_closed.move_to_end(group)
        while len(self._last_closed) > REMEMBERED_GROUPS:
            self._last_closed.popitem(last=False)
