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

Ranks that cannot meet fail at once, not at the timeout: every rank of a group
waiting, but at different steps (a desynchronized rank: one ran a training
forward the others did not); ranks of one layer's step that gave different
group ids; one group id with different world sizes. A rank whose call's
deadline comes before the step completes is answered shortly before it
(:data:`ANSWER_MARGIN`), with the step's failure, so the explanation reaches
the client rather than a bare DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from normserve.server import phases
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
#: A waiting rank is answered this share of its call's remaining time before its deadline (at most
#: MAX_ANSWER_MARGIN seconds), so that the server's explanation arrives before the client gives up.
ANSWER_MARGIN, MAX_ANSWER_MARGIN = 0.1, 2.0
#: How every rank goes on after a failed step (the torch modules number their steps themselves).
_NEXT_STEP = "start the next step (a new sync.step) on every rank; the torch modules do so by themselves"
_REALIGN = (
    "realign the ranks' step numbers (normserve.client.torch.realign_sync_steps(model) on every rank, or set each "
    "module's sync_step to the same number above all used), or restart the job from its checkpoint; "
    "a rank ran a training forward the others did not (a validation pass in train mode?)"
)


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
    opened: float = field(default_factory=lambda: asyncio.get_running_loop().time())
    parts: dict[int, Any] = field(default_factory=dict)
    complete: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SyncSteps:
    """The open synchronized steps of one server; ``timeout``: seconds the first rank waits for the last."""

    def __init__(self, timeout: float, max_world_size: int = 1024) -> None:
        self.timeout = timeout
        self.max_world_size = max_world_size
        self._open: dict[StepKey, _Step] = {}
        self._open_of_group: dict[str, set[StepKey]] = {}  # a group's open steps, on any layer
        self._open_at: dict[tuple[str, int, str], set[StepKey]] = {}  # (layer, step, phase) -> its groups' steps
        self._closed: OrderedDict[StepKey, ServiceError] = OrderedDict()  # why a step can no longer be joined
        self._last_closed: OrderedDict[StepSeries, int] = OrderedDict()  # the series' last committed step
        self._finishing: dict[StepKey, asyncio.Future] = {}  # complete steps whose finish runs

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
                    f"steps only move forward; use a step number above {last}. A new run, or a restarted "
                    "attempt, needs a new group id (the torch modules' process_group= makes one per run)"
                )
            return
        if step.world_size != spec.world_size:
            reason = (
                f"rank {spec.rank} gave sync.world_size {spec.world_size}, rank(s) "
                f"{', '.join(map(str, sorted(step.parts)))} gave {step.world_size}; every rank must give the same"
            )
            self.fail(key, reason)
            raise InvalidRequest(f"the {key.describe()}: {reason}")
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
        deadline: float | None,
    ) -> T:
        """Add this rank's ``part``; once all are in, the result of ``finish(parts in rank order)``.

        ``deadline`` (loop time) is this rank's call's: shortly before it
        (:data:`ANSWER_MARGIN`) an incomplete step fails for everyone, saying
        which ranks are missing; a cancelled call fails it too.
        """
        self.check(key, spec)
        step = self._open.get(key)
        if step is None:
            step = self._open[key] = _Step(spec.world_size)
            step.timer = asyncio.get_running_loop().call_later(self.timeout, self._expire, key)
            self._index(key)
        step.parts[spec.rank] = part
        if len(step.parts) == step.world_size:
            self._close(
                key,
                InvalidRequest(
                    f"the {key.describe()} has finished (every rank joined it), and each rank joins a step once: "
                    "this rank's step number is behind the others' (the torch modules: realign_sync_steps), or "
                    "a new run reuses an earlier run's group id (process_group= makes a new one per run)"
                ),
            )
            task = asyncio.ensure_future(finish([step.parts[rank] for rank in range(step.world_size)]))
            self._finishing[key] = task
            task.add_done_callback(functools.partial(self._committed, key))
            step.complete.set_result(task)
        else:
            self._check_meeting(key)
        try:
            with phases.timed("sync"):  # the wait for the other ranks (finish's own work counts as its phases)
                task = await asyncio.wait_for(asyncio.shield(step.complete), self._answer_within(deadline))
        except asyncio.TimeoutError:
            if step.complete.done() and step.complete.exception() is None:  # completed as the wait timed out
                return await asyncio.shield(step.complete.result())
            self._expire(key, f"before rank {spec.rank}'s call deadline")
            failure = self._closed.get(key) or SyncTimeout(f"the {key.describe()} did not complete in time")
            raise type(failure)(str(failure)) from None
        except BaseException:
            if not step.complete.done():
                self.fail(key, f"rank {spec.rank} gave up waiting (its call was cancelled)")
            raise
        # Once finishing has started it runs to the end; every rank waits for its result.
        return await asyncio.shield(task)

    @staticmethod
    def _answer_within(deadline: float | None) -> float | None:
        """Seconds a rank waits before it is answered: its call's remaining time less the answer margin."""
        if deadline is None:
            return None
        remaining = deadline - asyncio.get_running_loop().time()
        return max(0.0, remaining - min(MAX_ANSWER_MARGIN, ANSWER_MARGIN * remaining))

    # ------------------------------------------------------------------ ranks that cannot meet
    def _index(self, key: StepKey) -> None:
        self._open_of_group.setdefault(key.group, set()).add(key)
        self._open_at.setdefault((key.layer, key.step, key.phase), set()).add(key)

    def _unindex(self, key: StepKey) -> None:
        for index, slot in ((self._open_of_group, key.group), (self._open_at, (key.layer, key.step, key.phase))):
            keys = index.get(slot)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[slot]

    def _check_meeting(self, key: StepKey) -> None:
        """Fail at once the open steps whose ranks can never meet (see the module docstring)."""
        step = self._open[key]
        group = sorted(self._open_of_group.get(key.group, ()))
        sizes = {self._open[k].world_size for k in group}
        if len(sizes) > 1:
            named = "; ".join(f"{self._open[k].world_size} at the {k.describe()}" for k in group)
            self._fail_all(group, f"sync group {key.group!r} was given different world sizes: {named}", "")
            return
        for other in sorted(self._open_at.get((key.layer, key.step, key.phase), ())):
            theirs = self._open.get(other)
            # Another group's ranks, none of them one of ours, at this very step: the other half of our world.
            if (
                other.group != key.group
                and theirs
                and theirs.world_size == step.world_size
                and not theirs.parts.keys() & step.parts.keys()
            ):
                ranks = "; ".join(
                    f"rank(s) {', '.join(map(str, sorted(self._open[k].parts)))} with {k.group!r}" for k in (other, key)
                )
                self._fail_all(
                    [other, key],
                    f"the ranks of {key.phase} step {key.step} on layer {key.layer!r} gave different sync "
                    f"group ids ({ranks}); every rank of a job must give the same id (the torch modules' "
                    "process_group= makes one for all ranks)",
                    "",
                )
                return
        at = {rank: k for k in group for rank in self._open[k].parts}
        # Every rank waits, at steps of different numbers (or phases): none can complete. Steps of one number on
        # several layers are not that: a rank may train several layers at once (asyncio), its peers in another order.
        if len({(k.step, k.phase) for k in group}) > 1 and len(at) == step.world_size:
            named = ", ".join(
                f"rank {rank} at {at[rank].phase} step {at[rank].step} on layer {at[rank].layer!r}"
                for rank in sorted(at)[:NAMED_RANKS]
            )
            self._fail_all(
                group,
                f"the ranks of sync group {key.group!r} wait at different steps, so none can complete: {named}",
                _REALIGN,
            )

    def _fail_all(self, keys: list[StepKey], reason: str, then: str) -> None:
        for key in keys:
            self.fail(key, reason, then=then or _NEXT_STEP)

    def fail(self, key: StepKey, reason: str, error: type[ServiceError] = SyncAborted, then: str = _NEXT_STEP) -> None:
        """Fail step ``key`` (open or not yet opened) for every rank, with ``reason`` and what to do ``then``.

        A step already finished or failed keeps its outcome.
        """
        if key in self._closed:
            return
        failure = error(f"the {key.describe()} failed, nothing was changed: {reason}; {then}")
        step = self._open.get(key)
        self._close(key, failure)
        if step is not None and not step.complete.done():
            step.complete.set_exception(failure)
            step.complete.exception()  # retrieved: no "never retrieved" warning when no rank waits

    def _expire(self, key: StepKey, when: str = "") -> None:
        """Fail an incomplete step, naming the missing ranks: at the --sync-timeout, or ``when`` given."""
        step = self._open.get(key)
        if step is None:
            return
        count = step.world_size - len(step.parts)
        named = list(itertools.islice((r for r in range(step.world_size) if r not in step.parts), NAMED_RANKS))
        ranks = ", ".join(map(str, named)) + (", ..." if count > len(named) else "")
        waited = asyncio.get_running_loop().time() - step.opened
        when = when or f"within the server's --sync-timeout of {self.timeout:g} s"
        self.fail(
            key,
            f"rank(s) {ranks} ({count} of {step.world_size}) did not arrive {when} (the step waited {waited:.3g} s)",
            SyncTimeout,
        )

    def forget_layer(self, layer: str) -> None:
        """A deleted layer: its open steps fail (ABORTED) for their waiting ranks, and what is remembered
        of its steps is dropped, so a new layer of that name starts afresh."""
        for key in [key for key in self._open if key.layer == layer]:
            self.fail(key, "the layer was deleted")
        for memory in (self._closed, self._last_closed, self._finishing):
            for key in [key for key in memory if key.layer == layer]:
                del memory[key]

    def _close(self, key: StepKey, why: ServiceError) -> None:
        self._unindex(key)
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
        finishing = self._finishing.pop(key, None)
        if task.cancelled() or task.exception() is not None:  # retrieved even if nobody awaits
            return
        if finishing is None:
            return  # its layer was deleted (forget_layer) while it finished: nothing of it is remembered
        series = key.series
        self._last_closed[series] = max(key.step, self._last_closed.get(series, key.step))
        self._last_closed.move_to_end(series)
        while len(self._last_closed) > REMEMBERED_GROUPS:
            self._last_closed.popitem(last=False)
