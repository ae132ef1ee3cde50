"""Synchronized steps: the calls of several ranks that must meet before any of them goes on.

A synchronized Train or Gradient (a :class:`SyncSpec` on the request) is one
rank's part of a step of a sync group, as in torch.nn.SyncBatchNorm. Each
rank reduces its batch first, then :meth:`SyncSteps.join` holds its part
until every rank of the step's :class:`StepKey` has arrived; the last to
arrive runs the step's ``finish`` once (combine the parts, update the layer),
and every rank gets its result.

Failure is all or nothing: a rank that does not arrive within ``timeout``
seconds of the first fails the step for everyone with DEADLINE_EXCEEDED; a
rank that fails (bad input) or gives up (its deadline, a cancelled call)
fails it for the others with ABORTED. ``finish`` never runs for a failed
step, so a failed step changes no state. Finished and failed steps are
remembered (the most recent ones), so a late or repeated rank gets a clear
answer instead of waiting alone. Only a step that gathered all its ranks and
whose ``finish`` succeeded moves its series' mark (steps at or below it are
refused): a failed or timed-out step, whatever its number, leaves every
later step open. Step numbers are below 2**63 (:data:`MAX_STEP`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from normserve.server.errors import InvalidRequest, ServiceError, SyncAborted, SyncTimeout
from normserve.server.layer_config import NAME_PATTERN

__all__ = ["StepKey", "StepSeries", "SyncSpec", "SyncSteps"]

T = TypeVar("T")
#: Finished and failed steps remembered with why they closed (for a late or repeated rank's answer).
REMEMBERED_STEPS = 4096
#: Step series whose last closed step is remembered, least recently used out.
REMEMBERED_GROUPS = 16384
#: Missing ranks a timeout names (it counts the rest).
NAMED_RANKS = 8
#: Step numbers are below this (an int64 in every language; a wrapped or garbage uint64 is refused).
MAX_STEP = 2**63


class StepSeries(NamedTuple):
    """The numbered steps of one phase of a sync group on a layer: they only move forward."""

    layer: str
    group: str
    phase: str


class StepKey(NamedTuple):
    """One step the ranks meet at: ``phase`` (a Train's forward or a Gradient) of step ``step`` of sync group
    ``group`` on ``layer``."""

    layer: str
    group: str
    step: int
    phase: str

    @property
    def series(self) -> StepSeries:
        return StepSeries(self.layer, self.group, self.phase)

    def describe(self) -> str:
        return f"{self.phase} step {self.step} of sync group {self.group!r} on layer {self.layer!r}"


@dataclass(frozen=True)
class SyncSpec:
    """One rank's place in a synchronized step (the wire's SyncGroup, checked)."""

    group: str
    world_size: int
    rank: int
    step: int

    def __post_init__(self) -> None:
        # Group ids follow the layer-name rule: both are names a person picks and logs show.
        if not NAME_PATTERN.fullmatch(self.group):
            raise InvalidRequest(f"sync.id {self.group[:64]!r} must match {NAME_PATTERN.pattern}")
        if self.world_size < 1:
            raise InvalidRequest("sync.world_size must be at least 1 (the number of workers in the group)")
        if not 0 <= self.rank < self.world_size:
            raise InvalidRequest(f"sync.rank {self.rank} must be in [0, world_size) = [0, {self.world_size})")
        if not 0 <= self.step < MAX_STEP:
            raise InvalidRequest(f"sync.step {self.step} must be in [0, 2**63): count steps from 0 up")

    def step_key(self, layer: str, phase: str) -> StepKey:
        """The step this rank joins on ``layer`` in ``phase``."""
        return StepKey(layer, self.group, self.step, phase)


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
        self._open: dict[StepKey, _Step] = {}
        self._closed: OrderedDict[StepKey, ServiceError] = OrderedDict()  # why a step can no longer be joined
        self._last_closed: OrderedDict[StepSeries, int] = OrderedDict()  # the series' last committed step

    def check(self, key: StepKey, spec: SyncSpec) -> None:
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
            last = self._last_closed.get(key.series)
            if last is not None and key.step <= last:
                raise InvalidRequest(
                    f"the {key.describe()} cannot start: step {last} of the group has finished already, and "
                    f"steps only move forward; use a step number above {last}"
                )
            return
        if step.world_size != spec.world_size:
            raise InvalidRequest(
                f"sync.world_size {spec.world_size} differs from the {step.world_size} the other ranks of the "
                f"{key.describe()} gave; every rank must give the same"
            )
        if spec.rank in step.parts:
            raise InvalidRequest(
                f"rank {spec.rank} already joined the {key.describe()}; each rank joins a step once "
                "(a new step needs a new sync.step)"
            )

    async def join(
        self,
        key: StepKey,
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
            self._close(key, InvalidRequest(f"the {key.describe()} has finished; use the next step number"))
            task = asyncio.ensure_future(finish([step.parts[rank] for rank in range(step.world_size)]))
            task.add_done_callback(functools.partial(self._committed, key))
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

    def fail(self, key: StepKey, reason: str, error: type[ServiceError] = SyncAborted) -> None:
        """Fail step ``key`` (open or not yet opened) for every rank, with ``reason``.

        A step already finished or failed keeps its outcome.
        """
        if key in self._closed:
            return
        failure = error(
            f"the {key.describe()} failed, nothing was changed: {reason}; "
            "start the next step (a new sync.step) on every rank"
        )
        step = self._open.get(key)
        self._close(key, failure)
        if step is not None and not step.complete.done():
            step.complete.set_exception(failure)
            step.complete.exception()  # retrieved: no "never retrieved" warning when no rank waits

    def _expire(self, key: StepKey) -> None:
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
        for key in [key for key in self._open if key.layer == layer]:
            self.fail(key, "the layer was deleted")
        for memory in (self._closed, self._last_closed):
            for key in [key for key in memory if key.layer == layer]:
                del memory[key]

    def _close(self, key: StepKey, why: ServiceError) -> None:
        step = self._open.pop(key, None)
        if step is not None and step.timer is not None:
            step.timer.cancel()
        self._closed[key] = why
        self._closed.move_to_end(key)
        while len(self._closed) > REMEMBERED_STEPS:
            self._closed.popitem(last=False)

    def _committed(self, key: StepKey, task: asyncio.Future) -> None:
        """A step's ``finish`` ended: when it succeeded (the step committed), its series' mark moves up to it.
        A failed step moves nothing, so later steps stay open to all."""
        if task.cancelled() or task.exception() is not None:  # retrieved even if nobody awaits
            return
        if key not in self._closed:
            return  # its layer was deleted (forget_layer) while it finished: nothing of it is remembered
        series = key.series
        self._last_closed[series] = max(key.step, self._last_closed.get(series, key.step))
        self._last_closed.move_to_end(series)
        while len(self._last_closed) > REMEMBERED_GROUPS:
            self._last_closed.popitem(last=False)
