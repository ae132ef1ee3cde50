"""The named layers: who may change them, when, and how changes become durable.

Each layer is published as an immutable :class:`Snapshot`. Readers (Infer,
Gradient, GetState) take the current snapshot and never wait. Writers
(Train, SetState, DeleteLayer) queue on the layer's lock, work on a
copy-on-write copy of the layer, store the result, and only then publish it,
so a failed or rejected request leaves the published state and the database
exactly as they were. Kernel work runs on a thread pool (NumPy releases the
GIL, so different layers compute in parallel); SQLite runs on one thread of
its own, off the event loop.

Memory is bounded before it is spent: a new layer's state must fit
``max_layer_state_bytes`` and, with every other layer's, ``max_state_bytes``
(checked before its arrays exist). A stored layer that cannot be restored
does not stop the server: it is listed as :class:`Unrestorable` and its calls
answer DATA_LOSS until it is deleted (a row whose stored name is not a layer
name is listed under a placeholder name, ``damaged-row-<rowid>``, see
:mod:`normserve.server.store`).

Versions: a layer starts at 1 and each change of its state adds 1 (a Train
of a layer with running statistics, a SetState, a Rollback). The store keeps
the last ``keep_versions`` states of each layer: :meth:`Registry.state_at`
reads one, :meth:`Registry.rollback` makes one current again as a new
version, so versions only grow and ``expected_version`` stays meaningful.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import numpy as np

from normkernels import NormError, NormLayer, StateTooLarge, distributed, synced
from normkernels.backend import to_numpy
from normkernels.core import GradSums
from normkernels.monitor import BatchReport
from normserve.server import device_io, phases
from normserve.server.errors import (
    ForwardTooLarge,
    InvalidRequest,
    LayerExists,
    LayerNotFound,
    LayerTooLarge,
    LayerUnrestorable,
    ShuttingDown,
    StaleVersion,
    SyncAborted,
    TooManyLayers,
    VersionDamaged,
    VersionNotKept,
    WaitTimeout,
)
from normserve.server.forwards import Forward, ForwardCache
from normserve.server.layer_config import build_layer, check_name
from normserve.server.store import KeptVersion, StateStore, StateUpdate
from normserve.server.sync_groups import StepKey, SyncSpec, SyncSteps
from normserve.v1 import normalization_pb2 as pb

__all__ = ["RUNNING_KEYS", "Registry", "Snapshot", "StatisticsUpdate", "TrainingStats", "Unrestorable", "host_state"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RUNNING_KEYS = ("running_mean", "running_var")
#: The two halves of a synchronized step (the phase part of a step's key).
TRAINING_PHASE, GRADIENT_PHASE = "training forward", "gradient"
#: A synchronized backward in statistics mode: its ranks send sums, not tensors (they cannot meet Gradient ranks).
GRADIENT_STATISTICS_PHASE = "gradient statistics"
#: Batches up to this many elements compute on the event loop: their kernels take
#: tens of microseconds, less than handing them to a kernel thread and back.
INLINE_ELEMENTS = 1 << 14


@dataclass(frozen=True)
class TrainingStats:
    """Monitoring of a layer's Trains since the server started (not state: never stored)."""

    train_calls: int = 0
    latest: BatchReport | Callable[[], BatchReport] | None = None  # a statistics update's report comes due when read

    @property
    def last(self) -> BatchReport | None:
        """The last Train's report."""
        return self.latest() if callable(self.latest) else self.latest

    def after(self, report: BatchReport | Callable[[], BatchReport] | None, calls: int = 1) -> TrainingStats:
        """After ``calls`` more Trains; ``report`` None keeps the last report."""
        return TrainingStats(self.train_calls + calls, self.latest if report is None else report)


@dataclass(frozen=True)
class Snapshot:
    """A layer's state at one version, and its training stats. Never changed once published."""

    name: str
    layer: NormLayer
    version: int
    stats: TrainingStats = TrainingStats()
    oldest_version: int = 0  # the oldest version whose state is kept (0: this one; see oldest_kept)

    @property
    def oldest_kept(self) -> int:
        """The oldest version whose state is kept (at most this one)."""
        return self.oldest_version or self.version

    def after(self, layer: NormLayer, keep_versions: int, stats: TrainingStats | None = None) -> Snapshot:
        """The next version: ``layer``, with the versions kept of ``keep_versions``."""
        version = self.version + 1
        oldest = max(self.oldest_kept, version - keep_versions + 1)
        return Snapshot(self.name, layer, version, self.stats if stats is None else stats, oldest)

    def kept(self) -> KeptVersion:
        """This version's whole state, as the store keeps it."""
        return KeptVersion(self.version, self.layer.num_batches_tracked, host_state(self.layer))


@dataclass(frozen=True)
class StatisticsUpdate:
    """One layer's training batch given as its statistics, as a PushStatistics message carries it."""

    layer: str
    part: GradSums
    parameters: Mapping[str, np.ndarray]


#: What became of an update of :meth:`Registry.push_statistics`: the snapshot after it, or why it was refused.
Outcome = Snapshot | Exception


@dataclass(frozen=True)
class Unrestorable:
    """A stored layer the server could not restore at startup: listed, never served (DATA_LOSS)."""

    name: str
    config: pb.LayerConfig | None  # None when the stored config itself is unreadable
    version: int
    num_batches_tracked: int
    error: str
    stats: TrainingStats = TrainingStats()  # none: read like a Snapshot's by ListLayers and the metrics
    rowid: int | None = None  # set when ``name`` is a placeholder for a damaged row's name (store.StoredLayer)


class _Entry:
    """A name's current snapshot plus the lock that orders its writers."""

    def __init__(self, snapshot: Snapshot | Unrestorable) -> None:
        self.snapshot = snapshot
        self.lock = asyncio.Lock()
        self.deleted = False


def _host_array(io: Any, y: Any) -> np.ndarray:
    return io.to_host(y)


def _host_output(io: Any, result: tuple[Any, BatchReport]) -> tuple[np.ndarray, BatchReport]:
    y, report = result
    return io.to_host(y), report


def _host_gradients(io: Any, result: tuple[Any, dict[str, Any]]) -> tuple[np.ndarray, dict[str, Any]]:
    dx, grads = result
    return io.to_host(dx), {k: None if g is None else io.to_host(g) for k, g in grads.items()}


def _left_on_device(io: Any, result: T) -> T:
    # A synchronized step's parts stay where they were computed until the step combines them.
    return result


@dataclass(frozen=True)
class _OnDevice(Generic[T]):
    """A layer method run in one device session: its first ``inputs`` arguments (request arrays) are moved
    to the layer's device, and ``to_host`` brings back what the caller gets."""

    method: str
    inputs: int
    to_host: Callable[[Any, Any], T]
    synced: bool = False  # a method of the kinds that share batch statistics (ConfigError for the others)

    def __call__(self, layer: NormLayer, *args: Any) -> T:
        target = synced(layer) if self.synced else layer
        with device_io.session(layer.device) as io:
            moved = [io.to_device(array) for array in args[: self.inputs]]
            return self.to_host(io, getattr(target, self.method)(*moved, *args[self.inputs :]))


_forward = _OnDevice("forward", 1, _host_array)  # (layer, x, training)
_train = _OnDevice("train_with_report", 1, _host_output)  # (layer, x)
_backward = _OnDevice("backward", 2, _host_gradients)  # (layer, x, dy, training)
# A synchronized step's halves (see normkernels.layers: synced_part ... backward_synced).
_synced_part = _OnDevice("synced_part", 1, _left_on_device, synced=True)  # (layer, x)
_forward_synced = _OnDevice("forward_synced", 1, _host_array, synced=True)  # (layer, x, total)
_synced_grad_part = _OnDevice("synced_grad_part", 2, _left_on_device, synced=True)  # (layer, x, dy) -> (part, pending)
_backward_synced = _OnDevice("backward_synced", 0, _host_gradients, synced=True)  # (layer, pending, part, total)


def _checked_statistics(layer: NormLayer, part: GradSums) -> GradSums:
    """A rank's statistics, refused before it joins its step when they do not fit the layer."""
    return synced(layer).check_statistics(part, synchronized=True)


def host_state(layer: NormLayer, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The layer's float state tensors (all, or ``keys``) as NumPy arrays.

    No copies on CPU: a published layer never changes its arrays (see ``Layer.copy``).
    """
    if keys is None:
        keys = tuple(k for k in layer.state_keys if k != "num_batches_tracked")
    return {k: to_numpy(getattr(layer, k)) for k in keys}


class Registry:
    """All layers of one server, backed by a :class:`StateStore`.

    Methods that may wait (for a layer's earlier writes, or a free kernel
    thread) take ``wait``: seconds after which they give up with
    DEADLINE_EXCEEDED, having changed nothing; None waits as long as needed.
    Once a write holds its locks it runs to the end.
    """

    def __init__(
        self,
        store: StateStore,
        *,
        default_device: str,
        workers: int,
        max_layers: int | None = None,
        forward_cache_bytes: int = 1 << 30,
        sync_timeout: float = 60.0,
        max_world_size: int = 1024,
        max_layer_state_bytes: int | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        self._store = store
        self.default_device = default_device
        self.max_layers = max_layers
        self.max_layer_state_bytes = max_layer_state_bytes
        self.max_state_bytes = max_state_bytes
        self.forwards = ForwardCache(forward_cache_bytes)
        self.sync = SyncSteps(sync_timeout, max_world_size)
        self._kernels = ThreadPoolExecutor(workers, thread_name_prefix="normserve-kernel")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="normserve-store")
        self._entries: dict[str, _Entry] = {}
        self._names = asyncio.Lock()  # orders creates and deletes
        self._pending: set[asyncio.Future] = set()
        self._closing = False

    # ------------------------------------------------------------------ startup / shutdown
    def load(self) -> int:
        """Restore every stored layer (call once, before serving); returns how many.

        A layer that cannot be restored is logged and kept as :class:`Unrestorable`: the others serve.
        """
        oldest = self._store.oldest_versions()
        for stored in self._store.load_all():
            try:
                config = None if stored.config is None else pb.LayerConfig.FromString(stored.config)
            except Exception as exc:
                self._unrestorable(stored, None, f"its stored config is unreadable: {exc}")
                continue
            try:
                if stored.problem:
                    raise ValueError(stored.problem)
                layer = build_layer(config, self.default_device)
                state: dict[str, Any] = dict(stored.tensors)
                if "num_batches_tracked" in layer.state_keys:
                    state["num_batches_tracked"] = np.int64(stored.num_batches_tracked)
                layer.load_state_dict(state)
            except Exception as exc:
                self._unrestorable(stored, config, str(exc))
                continue
            snapshot = Snapshot(stored.name, layer, stored.version, oldest_version=oldest.get(stored.name, 0))
            self._entries[stored.name] = _Entry(snapshot)
        if self.max_state_bytes is not None and self.state_bytes > self.max_state_bytes:
            log.warning(
                "restored layers hold %d bytes of state, over --max-state-bytes %d: no new layer fits",
                self.state_bytes,
                self.max_state_bytes,
            )
        return len(self._entries)

    def _unrestorable(self, stored: Any, config: pb.LayerConfig | None, error: str) -> None:
        log.error(
            "cannot restore layer %r from %s%s: %s; it is listed with this error and answers DATA_LOSS until "
            "deleted (DeleteLayer: client.delete_layer(name)), the other layers serve",
            stored.name,
            self._store.path,
            "" if stored.rowid is None else f" (a placeholder name for row {stored.rowid} of its layers table)",
            error,
        )
        unrestorable = Unrestorable(
            stored.name, config, stored.version, stored.num_batches_tracked, error, rowid=stored.rowid
        )
        self._entries[stored.name] = _Entry(unrestorable)

    async def close(self) -> None:
        """Refuse new writes, let started ones finish, and close the store."""
        self._closing = True
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._kernels.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._writer, self._store.close)
        self._writer.shutdown(wait=True)

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _deadline(wait: float | None) -> float | None:
        return None if wait is None else asyncio.get_running_loop().time() + wait

    @staticmethod
    async def _within(awaitable: Awaitable[T], deadline: float | None, what: str, phase: str | None = "queue") -> T:
        """Await ``awaitable`` until the loop-time ``deadline``; WaitTimeout after it. The wait counts as
        ``phase`` of the call (:mod:`~normserve.server.phases`; None: the caller counts it)."""
        with contextlib.nullcontext() if phase is None else phases.timed(phase):
            if deadline is None:
                return await awaitable
            try:
                return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                pass
            raise WaitTimeout(
                f"gave up waiting for {what}; nothing was changed. Retry, give the call a longer deadline, "
                "or start the server with a longer --default-deadline"
            )

    async def _compute(
        self, fn: Callable[..., T], *args: Any, deadline: float | None = None, elements: int | None = None
    ) -> T:
        """Run ``fn`` on a kernel thread (inline when it works on at most INLINE_ELEMENTS ``elements``).

        Past ``deadline`` the answer is abandoned (only work that changes
        nothing takes one: reads, and building a layer before it is published).
        """
        if elements is not None and elements <= INLINE_ELEMENTS:
            with phases.timed("compute"):
                return fn(*args)
        return await phases.run_in(
            self._kernels,
            functools.partial(fn, *args),
            "compute",
            lambda future: self._within(
                future, deadline, "the kernel threads (the server is busy or the work large)", phase=None
            ),
        )

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the store's thread (reads too: they queue behind the writes before them)."""
        return await phases.run_in(self._writer, functools.partial(fn, *args), "store")

    @property
    def keep_versions(self) -> int:
        return self._store.keep_versions

    async def _commit(self, locks: list[asyncio.Lock], work: Callable[[], Awaitable[T]]) -> T:
        """With ``locks`` held: run ``work`` to the end even if the caller goes away, then release them.

        A write that has started must store and publish together; cancelling it
        between the two would leave memory and database disagreeing.
        """

        async def run() -> T:
            try:
                if self._closing:
                    raise ShuttingDown("the server is shutting down; retry on another replica or after restart")
                return await work()
            finally:
                for lock in reversed(locks):
                    lock.release()

        task = asyncio.ensure_future(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody awaits
        return await asyncio.shield(task)

    def _entry(self, name: str, *, usable: bool = True) -> _Entry:
        """The entry of ``name``; NOT_FOUND, or DATA_LOSS for an unrestorable layer unless not ``usable``."""
        entry = self._entries.get(name)
        if entry is None:
            raise LayerNotFound(check_name(name))
        if usable and isinstance(entry.snapshot, Unrestorable):
            raise LayerUnrestorable(name, entry.snapshot.error)
        return entry

    async def _with_lock(self, name: str, work: Callable[[_Entry], Awaitable[T]], wait: float | None) -> T:
        entry = self._entry(name)
        await self._within(entry.lock.acquire(), self._deadline(wait), f"the earlier writes of layer {name!r}")

        async def unless_deleted() -> T:
            if entry.deleted:  # deleted while this request queued
                raise LayerNotFound(name)
            return await work(entry)

        return await self._commit([entry.lock], unless_deleted)

    # ------------------------------------------------------------------ layers
    @property
    def state_bytes(self) -> int:
        """Bytes of the state of every layer held (unrestorable ones hold none)."""
        return sum(
            entry.snapshot.layer.state_nbytes
            for entry in list(self._entries.values())
            if isinstance(entry.snapshot, Snapshot)
        )

    def get(self, name: str) -> Snapshot:
        return self._entry(name).snapshot

    def describe(self, name: str) -> Snapshot | Unrestorable:
        """What ``name`` holds, unrestorable or not."""
        return self._entry(name, usable=False).snapshot

    def list(self, prefix: str = "") -> list[Snapshot | Unrestorable]:
        # One atomic copy of the entries: metrics scrapes call this from their own thread.
        return [entry.snapshot for name, entry in sorted(self._entries.items()) if name.startswith(prefix)]

    async def create(self, name: str, config: pb.LayerConfig, *, wait: float | None = None) -> tuple[Snapshot, bool]:
        """Create ``name`` (or return it unchanged if it exists with an equal config); True when new."""
        check_name(name)
        deadline = self._deadline(wait)
        layer = await self._compute(self._build, name, config, deadline=deadline)
        await self._within(self._names.acquire(), deadline, "other creates and deletes")

        async def create_locked() -> tuple[Snapshot, bool]:
            existing = self._entries.get(name)
            if existing is not None:
                current = existing.snapshot
                if isinstance(current, Unrestorable):
                    raise LayerExists(f"layer {name!r} exists but could not be restored; delete it first")
                if current.layer.config != layer.config:
                    raise _taken(name, current)
                return current, False
            if self.max_layers is not None and len(self._entries) >= self.max_layers:
                raise TooManyLayers(
                    f"the server holds {len(self._entries)} layers, its limit (--max-layers {self.max_layers}); "
                    "delete layers you no longer need or raise the limit"
                )
            if self.max_state_bytes is not None and self.state_bytes + layer.state_nbytes > self.max_state_bytes:
                raise self._over_total(layer.state_nbytes)  # checked again under the lock: creates may race
            snapshot = Snapshot(name, layer, 1)
            stored = pb.LayerConfig()
            stored.CopyFrom(config)
            stored.DiscardUnknownFields()  # only what the layer is: unknown fields would be stored bytes unbudgeted
            await self._write(
                self._store.create_layer,
                name,
                stored.SerializeToString(deterministic=True),
                snapshot.version,
                layer.num_batches_tracked,
                host_state(layer),
            )
            self._entries[name] = _Entry(snapshot)
            return snapshot, True

        return await self._commit([self._names], create_locked)

    def _build(self, name: str, config: pb.LayerConfig) -> NormLayer:
        """A layer for ``config``, refused before its arrays exist when its state is over a budget.

        For a name that exists the budget is that layer's size: an equal config is answered even when the
        budgets are full (a restarted job creating its layers again), a larger one cannot be, and is refused.
        """
        existing = self._entries.get(name)
        if existing is not None and isinstance(existing.snapshot, Snapshot):
            try:
                return build_layer(config, self.default_device, max_state_bytes=existing.snapshot.layer.state_nbytes)
            except StateTooLarge:
                raise _taken(name, existing.snapshot) from None
        per_layer, total = self.max_layer_state_bytes, self.max_state_bytes
        room = [
            limit for limit in (per_layer, None if total is None else total - self.state_bytes) if limit is not None
        ]
        try:
            return build_layer(config, self.default_device, max_state_bytes=max(0, min(room)) if room else None)
        except StateTooLarge as exc:
            if per_layer is not None and exc.needed > per_layer:
                raise LayerTooLarge(
                    f"the layer's state needs {exc.needed} bytes, over the server's limit of {per_layer} "
                    "per layer (--max-layer-state-bytes)"
                ) from None
            raise self._over_total(exc.needed) from None

    def _over_total(self, needed: int) -> LayerTooLarge:
        return LayerTooLarge(
            f"the layer's state needs {needed} bytes, but the server's layers hold {self.state_bytes} of the "
            f"{self.max_state_bytes} bytes they may (--max-state-bytes); delete layers or raise the limit"
        )

    async def delete(self, name: str, *, wait: float | None = None) -> Snapshot | Unrestorable:
        """Delete ``name`` once its queued writes are done; returns its last snapshot (unrestorable ones too)."""
        self._entry(name, usable=False)  # bad name or NOT_FOUND before queuing
        deadline = self._deadline(wait)
        # Holding the names lock, no create or delete of any name interleaves; the
        # entry is the one the name holds now, not when the call came in.
        await self._within(self._names.acquire(), deadline, "other creates and deletes")
        try:
            entry = self._entry(name, usable=False)
            await self._within(entry.lock.acquire(), deadline, f"the earlier writes of layer {name!r}")
        except BaseException:
            self._names.release()
            raise

        async def delete_locked() -> Snapshot | Unrestorable:
            await self._write(self._store.delete_layer, name, getattr(entry.snapshot, "rowid", None))
            entry.deleted = True
            del self._entries[name]
            self.forwards.drop_layer(name)
            self.sync.forget_layer(name)
            return entry.snapshot

        return await self._commit([self._names, entry.lock], delete_locked)

    # ------------------------------------------------------------------ compute
    async def train(
        self,
        name: str,
        x: np.ndarray,
        *,
        wait: float | None = None,
        keep_dtype: int | None = None,
        parameters: Mapping[str, np.ndarray] | None = None,
        sync: SyncSpec | None = None,
    ) -> tuple[np.ndarray, Snapshot, str]:
        """Training forward; updates and stores the running statistics atomically.

        ``parameters`` (new weight and/or bias) apply before the batch and are
        stored with its update. With ``keep_dtype`` (x's wire dtype) the
        forward is kept for a later Gradient; the third result is its id (""
        when not kept). ``x`` must then stay unchanged: the server holds it,
        not a copy. ``sync`` makes the batch one rank's part of a synchronized
        step (:mod:`normserve.server.sync_groups`).
        """
        if keep_dtype is not None:
            try:
                if self.forwards.admit(x, self.get(name).layer.state_nbytes):
                    x = await self._compute(np.copy, x, elements=x.size)
            except ForwardTooLarge as exc:
                if sync is not None:
                    self.refuse_rank(name, sync, TRAINING_PHASE, exc)
                raise
        if sync is not None:
            return await self._train_synced(name, x, wait, keep_dtype, parameters or {}, sync)

        async def work(entry: _Entry) -> tuple[np.ndarray, Snapshot, str]:
            current = entry.snapshot
            start = _with_parameters(current, parameters)
            layer = start.layer.copy()
            y, report = await self._compute(_train, layer, x, elements=x.size)
            await self._publish(entry, start, layer, current.stats.after(report), parameters)
            return y, entry.snapshot, self._keep(name, x, keep_dtype, start)

        return await self._with_lock(name, work, wait)

    async def _train_synced(
        self,
        name: str,
        x: np.ndarray,
        wait: float | None,
        keep_dtype: int | None,
        parameters: Mapping[str, np.ndarray],
        sync: SyncSpec,
    ) -> tuple[np.ndarray, Snapshot, str]:
        """One rank's Train of a synchronized step: its moments in, the combined statistics out."""
        total, start, after = await self._training_step(
            name, lambda layer: _synced_part(layer, x), parameters, sync, wait
        )
        y = await self._compute(_forward_synced, start.layer, x, total, elements=x.size)
        return y, after, self._keep(name, x, keep_dtype, start)

    async def train_statistics(
        self,
        name: str,
        part: GradSums,
        *,
        wait: float | None = None,
        parameters: Mapping[str, np.ndarray] | None = None,
        sync: SyncSpec | None = None,
    ) -> tuple[GradSums, Snapshot]:
        """A training batch given as its statistics (statistics mode): folded into the running statistics as
        its Train would; returns the statistics to normalize with (the step's, under ``sync``) and the
        snapshot after."""
        if sync is not None:
            checked = functools.partial(_checked_statistics, part=part)
            total, _, after = await self._training_step(name, checked, parameters or {}, sync, wait)
            return total, after

        async def work(entry: _Entry) -> tuple[GradSums, Snapshot]:
            current = entry.snapshot
            start = _with_parameters(current, parameters)
            layer = start.layer.copy()
            report = await self._compute(layer.fold_statistics, part, elements=np.size(part.moments.var))
            await self._publish(entry, start, layer, current.stats.after(report), parameters)
            return part, entry.snapshot

        return await self._with_lock(name, work, wait)

    async def push_statistics(self, updates: Sequence[StatisticsUpdate], *, wait: float | None = None) -> list[Outcome]:
        """Each update as :meth:`train_statistics` without sync would apply it, in order (a layer's second
        update after its first), all stored in one transaction: per update, the snapshot after it or the
        exception that refused it. A refused update changes nothing; the others are stored or refused each
        on their own, except a failed store, which refuses every update of the message. Each stored update
        is a version; of a layer's updates in one message, the last one's state is stored and kept."""
        outcomes: list[Outcome | None] = [None] * len(updates)
        entries: dict[str, _Entry] = {}
        for index, update in enumerate(updates):
            try:
                entries.setdefault(update.layer, self._entry(update.layer))
            except Exception as exc:  # unknown or unrestorable: this update alone
                outcomes[index] = exc
        locks = await self._locks_of([entries[name] for name in sorted(entries)], self._deadline(wait))

        async def work() -> None:
            after: dict[str, Snapshot] = {}
            for index, update in enumerate(updates):
                if outcomes[index] is None:
                    outcomes[index] = await self._tracked(entries[update.layer], after, update)
            changed: dict[str, set[str]] = {}
            for update, outcome in zip(updates, outcomes, strict=True):
                if isinstance(outcome, Snapshot):
                    changed.setdefault(update.layer, set(RUNNING_KEYS)).update(update.parameters)
            # A layer's last state of the message is stored, once: the versions before it were never current
            # (the message publishes whole), so they are not kept either.
            writes = [
                StateUpdate(name, s.version, s.layer.num_batches_tracked, host_state(s.layer, tuple(changed[name])))
                for name, s in after.items()
            ]
            if not writes:
                return
            try:
                await self._write(self._store.update_states, writes)
            except Exception as exc:  # nothing of the message is stored: every update it would have stored fails
                outcomes[:] = [exc if isinstance(outcome, Snapshot) else outcome for outcome in outcomes]
                return
            for name, snapshot in after.items():
                entries[name].snapshot = snapshot

        await self._commit(locks, work)
        return [outcome for outcome in outcomes if outcome is not None]  # every one is set by now

    async def _locks_of(self, entries: list[_Entry], deadline: float | None) -> list[asyncio.Lock]:
        """The locks of ``entries``, taken in the order given (sorted by name: writers never deadlock)."""
        taken: list[asyncio.Lock] = []
        try:
            for entry in entries:
                await self._within(entry.lock.acquire(), deadline, "the earlier writes of the message's layers")
                taken.append(entry.lock)
        except BaseException:
            for lock in reversed(taken):
                lock.release()
            raise
        return taken

    async def _tracked(self, entry: _Entry, after: dict[str, Snapshot], update: StatisticsUpdate) -> Outcome:
        """``update`` applied after the updates of its layer before it in the message (``after``)."""
        try:
            if entry.deleted:  # deleted while the message queued
                raise LayerNotFound(update.layer)
            current = after.get(update.layer, entry.snapshot)
            assert isinstance(current, Snapshot)  # _entry refused unrestorable layers
            start = _with_parameters(current, update.parameters)
            layer = start.layer.copy()
            report = await self._compute(layer.fold_statistics, update.part, elements=np.size(update.part.moments.var))
        except Exception as exc:
            return exc
        after[update.layer] = snapshot = start.after(layer, self.keep_versions, current.stats.after(report))
        return snapshot

    async def _training_step(
        self,
        name: str,
        reduce: Callable[[NormLayer], GradSums],
        parameters: Mapping[str, np.ndarray],
        sync: SyncSpec,
        wait: float | None,
    ) -> tuple[GradSums, Snapshot, Snapshot]:
        """A synchronized step's training half: this rank's ``reduce(layer)`` joined to the others', the
        running statistics updated once from the combined statistics. Returns them, the snapshot the step
        ran on and the one after."""
        key = sync.step_key(name, TRAINING_PHASE)
        deadline = self._deadline(wait)

        async def finish(
            parts: list[tuple[GradSums, Mapping[str, np.ndarray]]], owner: _Entry
        ) -> tuple[GradSums, Snapshot, Snapshot]:
            total = distributed.combine([sums for sums, _ in parts])
            agreed = _agreed_parameters([given for _, given in parts])

            async def work(entry: _Entry) -> tuple[GradSums, Snapshot, Snapshot]:
                if entry is not owner:
                    raise _recreated(name)
                current = entry.snapshot
                start = _with_parameters(current, agreed)
                layer = start.layer.copy()
                report = await self._compute(synced(layer).track_synced, total, elements=np.size(total.moments.var))
                await self._publish(entry, start, layer, current.stats.after(report, len(parts)), agreed)
                return total, start, entry.snapshot

            return await self._with_lock(name, work, wait)

        def joined(layer: NormLayer) -> tuple[GradSums, Mapping[str, np.ndarray]]:
            _with_parameters(Snapshot(name, layer, 0), parameters)  # refuse bad parameters before joining
            return reduce(layer), parameters

        _, result = await self._synced(key, sync, deadline, finish, joined)
        return result

    async def _synced(
        self,
        key: StepKey,
        sync: SyncSpec,
        deadline: float | None,
        finish: Callable[[list[Any]], Awaitable[T]],
        reduce: Callable[[Any], Any],
        snapshot: Snapshot | None = None,
    ) -> tuple[Any, T]:
        """This rank's part, ``reduce(layer)``, joined to step ``key``; and the step's result,
        ``finish(parts, entry)`` where every part was computed on ``entry``, the layer's entry.

        A rank that fails to reduce fails the step for all, and so does a layer deleted (and maybe created
        again) while the step gathers: parts of different layers never meet.
        """
        self.sync.check(key, sync)
        try:
            owner = self._entry(key.layer)
            part = await self._compute(reduce, (snapshot or owner.snapshot).layer, deadline=deadline)
        except Exception as exc:
            self.sync.fail(key, f"rank {sync.rank} was refused ({exc})")
            raise

        async def finish_one_layer(parts: list[tuple[_Entry, Any]]) -> T:
            if any(entry is not owner for entry, _ in parts):
                raise _recreated(key.layer)
            return await finish([part for _, part in parts], owner)

        result = await self.sync.join(key, sync, (owner, part), finish_one_layer, deadline)
        return part, result

    async def _publish(
        self,
        entry: _Entry,
        start: Snapshot,
        layer: NormLayer,
        stats: TrainingStats,
        parameters: Mapping[str, np.ndarray] | None,
    ) -> None:
        """Store and publish a trained ``layer`` (a new version when its state changed)."""
        changed = tuple(parameters or ()) + (RUNNING_KEYS if layer.track_running_stats else ())
        if not changed:  # no state changed: same version, nothing to store
            entry.snapshot = replace(entry.snapshot, stats=stats)
            return
        snapshot = start.after(layer, self.keep_versions, stats)
        state = host_state(layer, changed)
        await self._write(self._store.update_state, start.name, snapshot.version, layer.num_batches_tracked, state)
        entry.snapshot = snapshot

    def refuse_rank(self, name: str, sync: SyncSpec, phase: str, error: Exception) -> None:
        """A rank refused before it could join its ``phase`` step (a bad request): the step fails for the
        others at once (ABORTED) rather than leaving them to time out."""
        if name in self._entries:
            self.sync.fail(sync.step_key(name, phase), f"rank {sync.rank} was refused ({error})")

    def _keep(self, name: str, x: np.ndarray, keep_dtype: int | None, start: Snapshot) -> str:
        return "" if keep_dtype is None else self.forwards.keep(Forward(name, x, keep_dtype, start))

    def kept_forward(self, name: str, forward_id: str) -> Forward:
        """The forward a Train of ``name`` kept under ``forward_id`` (FAILED_PRECONDITION when gone)."""
        self._entry(name)
        return self.forwards.get(forward_id, name)

    async def infer(self, name: str, x: np.ndarray, *, wait: float | None = None) -> tuple[np.ndarray, Snapshot]:
        """Inference forward on the current snapshot; never waits for writers."""
        snapshot = self.get(name)
        y = await self._compute(_forward, snapshot.layer, x, False, deadline=self._deadline(wait), elements=x.size)
        return y, snapshot

    async def gradient(
        self,
        name: str,
        x: np.ndarray,
        dy: np.ndarray,
        training: bool,
        *,
        wait: float | None = None,
        snapshot: Snapshot | None = None,
        sync: SyncSpec | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray | None], Snapshot]:
        """Backward pass on ``snapshot`` (default: the current one); never changes state.

        ``sync`` combines the batch-statistics terms with the other ranks of a
        synchronized step; dweight and dbias stay this rank's own.
        """
        snapshot = snapshot or self.get(name)
        deadline = self._deadline(wait)
        if sync is None:
            dx, grads = await self._compute(
                _backward, snapshot.layer, x, dy, training, deadline=deadline, elements=x.size
            )
            return dx, grads, snapshot
        if not training:
            error = InvalidRequest(
                "sync applies to training-mode gradients only: eval mode uses the running statistics, "
                "which need no other rank; leave sync unset or set training"
            )
            self.refuse_rank(name, sync, GRADIENT_PHASE, error)
            raise error

        async def finish(parts: list[tuple[GradSums, Any]], owner: _Entry) -> GradSums:
            return distributed.combine([sums for sums, _ in parts])

        key = sync.step_key(name, GRADIENT_PHASE)

        def reduce(layer: Any) -> tuple[GradSums, Any]:
            return _synced_grad_part(layer, x, dy)

        (part, pending), total = await self._synced(key, sync, deadline, finish, reduce, snapshot)
        dx, grads = await self._compute(_backward_synced, snapshot.layer, pending, part, total, elements=x.size)
        return dx, grads, snapshot

    async def gradient_statistics(
        self, name: str, part: GradSums, sync: SyncSpec, *, wait: float | None = None
    ) -> GradSums:
        """A synchronized backward's sums in statistics mode: ``part``'s summed with the step's other ranks'."""

        async def finish(parts: list[GradSums], owner: _Entry) -> GradSums:
            return distributed.add(parts)

        def reduce(layer: NormLayer) -> GradSums:
            synced(layer)  # only the kinds that synchronize have synchronized backwards
            return part

        _, total = await self._synced(
            sync.step_key(name, GRADIENT_STATISTICS_PHASE), sync, self._deadline(wait), finish, reduce
        )
        return total

    async def set_state(
        self,
        name: str,
        state: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        partial: bool = False,
        wait: float | None = None,
    ) -> Snapshot:
        """Load a state dict all-or-nothing, optionally only at ``expected_version``."""

        async def work(entry: _Entry) -> Snapshot:
            current = entry.snapshot
            if expected_version is not None and expected_version != current.version:
                raise StaleVersion(
                    f"layer {name!r} is at version {current.version}, not the expected {expected_version}: "
                    "it changed since you read it; read it again (GetState) and retry"
                )
            layer = current.layer.copy()
            await self._compute(layer.load_state_dict, state, not partial)
            snapshot = current.after(layer, self.keep_versions)
            changed = tuple(k for k in state if k != "num_batches_tracked")
            await self._write(
                self._store.update_state, name, snapshot.version, layer.num_batches_tracked, host_state(layer, changed)
            )
            entry.snapshot = snapshot
            return snapshot

        return await self._with_lock(name, work, wait)

    async def state_at(self, name: str, version: int | None = None) -> KeptVersion:
        """The whole state of ``name`` at ``version`` (None: the current one), if it is kept (NOT_FOUND if not)."""
        current = self.get(name)
        if version is None or version == current.version:
            return current.kept()
        kept = None
        if current.oldest_kept <= version < current.version:
            kept = await self._write(self._store.load_version, name, version)
        if kept is None:
            raise VersionNotKept(name, version, current.oldest_kept, current.version)
        return kept

    async def rollback(self, name: str, version: int, *, wait: float | None = None) -> Snapshot:
        """Make the kept ``version``'s state the current one again, as the next version; durable first."""

        async def work(entry: _Entry) -> Snapshot:
            current = entry.snapshot
            kept = await self.state_at(name, version)
            layer = current.layer.copy()
            state: dict[str, Any] = dict(kept.tensors)
            if "num_batches_tracked" in layer.state_keys:
                state["num_batches_tracked"] = np.int64(kept.num_batches_tracked)
            try:
                await self._compute(layer.load_state_dict, state)
            except NormError as exc:  # the server's own rows, not the client's request, do not fit
                raise VersionDamaged(name, version, f"its state does not fit the layer: {exc}") from None
            snapshot = current.after(layer, self.keep_versions)
            await self._write(
                self._store.update_state, name, snapshot.version, layer.num_batches_tracked, host_state(layer)
            )
            entry.snapshot = snapshot
            return snapshot

        return await self._with_lock(name, work, wait)


def _taken(name: str, existing: Snapshot) -> LayerExists:
    return LayerExists(
        f"layer {name!r} exists with a different config ({existing.layer!r}); delete it first or choose another name"
    )


def _recreated(name: str) -> SyncAborted:
    return SyncAborted(
        f"layer {name!r} was deleted (and maybe created again) while the synchronized step gathered; nothing "
        "was changed: start the next step on every rank"
    )


def _with_parameters(current: Snapshot, parameters: Mapping[str, np.ndarray] | None) -> Snapshot:
    """``current`` with new weight and/or bias (validated; a copy-on-write layer), or itself."""
    if not parameters:
        return current
    if not set(parameters) <= {"weight", "bias"} & set(current.layer.state_keys):
        raise InvalidRequest(
            f"parameters may hold the layer's weight and bias only (it has {list(current.layer.state_keys)}), "
            f"got {sorted(parameters)}"
        )
    layer = current.layer.copy()
    layer.load_state_dict(parameters, strict=False)
    return replace(current, layer=layer)


def _agreed_parameters(given: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The parameters the ranks of a step sent: each key from any rank that sent it, equal on all that did."""
    agreed: dict[str, np.ndarray] = {}
    for rank, parameters in enumerate(given):
        for key, value in parameters.items():
            if key in agreed and not np.array_equal(agreed[key], value):
                raise InvalidRequest(
                    f"the ranks of the step sent different parameters[{key!r}] (rank {rank} differs from an "
                    "earlier rank); data-parallel ranks must hold equal parameters"
                )
            agreed.setdefault(key, value)
    return agreed
