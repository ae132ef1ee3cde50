"""The named layers: who may change them, when, and how changes become durable.

Each layer is published as an immutable :class:`Snapshot`. Readers (Infer,
Gradient, GetState) take the current snapshot and never wait. Writers
(Train, SetState, DeleteLayer) queue on the layer's lock, work on a
copy-on-write copy of the layer, store the result, and only then publish it,
so a failed or rejected request leaves the published state and the database
exactly as they were. Kernel work runs on a thread pool (NumPy releases the
GIL, so different layers compute in parallel); SQLite runs on one thread of
its own, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from normkernels.backend import to_numpy
from normkernels.monitor import BatchReport
from normserve.server import device_io
from normserve.server.errors import (
    LayerExists,
    LayerNotFound,
    ShuttingDown,
    StaleVersion,
    TooManyLayers,
    WaitTimeout,
)
from normserve.server.forwards import Forward, ForwardCache
from normserve.server.layer_config import build_layer, check_name
from normserve.server.store import StateStore
from normserve.v1 import normalization_pb2 as pb

__all__ = ["Registry", "Snapshot", "TrainingStats"]

T = TypeVar("T")
_RUNNING_KEYS = ("running_mean", "running_var")
#: Batches up to this many elements compute on the event loop: their kernels take
#: tens of microseconds, less than handing them to a kernel thread and back.
INLINE_ELEMENTS = 1 << 14


@dataclass(frozen=True)
class TrainingStats:
    """Monitoring of a layer's Trains since the server started (not state: never stored)."""

    train_calls: int = 0
    last: BatchReport | None = None

    def after(self, report: BatchReport) -> TrainingStats:
        return TrainingStats(self.train_calls + 1, report)


@dataclass(frozen=True)
class Snapshot:
    """A layer's state at one version, and its training stats. Never changed once published."""

    name: str
    layer: Any
    version: int
    stats: TrainingStats = TrainingStats()


class _Entry:
    """A name's current snapshot plus the lock that orders its writers."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.lock = asyncio.Lock()
        self.deleted = False


def _forward(layer: Any, x: np.ndarray, training: bool) -> np.ndarray:
    with device_io.session(layer.device) as io:
        return io.to_host(layer.forward(io.to_device(x), training=training))


def _train(layer: Any, x: np.ndarray) -> tuple[np.ndarray, BatchReport]:
    with device_io.session(layer.device) as io:
        y, report = layer.train_with_report(io.to_device(x))
        return io.to_host(y), report


def _backward(layer: Any, x: np.ndarray, dy: np.ndarray, training: bool) -> tuple[np.ndarray, dict[str, Any]]:
    with device_io.session(layer.device) as io:
        dx, grads = layer.backward(io.to_device(x), io.to_device(dy), training=training)
        return io.to_host(dx), {k: None if g is None else io.to_host(g) for k, g in grads.items()}


def host_state(layer: Any, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
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
    ) -> None:
        self._store = store
        self.default_device = default_device
        self.max_layers = max_layers
        self.forwards = ForwardCache(forward_cache_bytes)
        self._kernels = ThreadPoolExecutor(workers, thread_name_prefix="normserve-kernel")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="normserve-store")
        self._entries: dict[str, _Entry] = {}
        self._names = asyncio.Lock()  # orders creates and deletes
        self._pending: set[asyncio.Future] = set()
        self._closing = False

    # ------------------------------------------------------------------ startup / shutdown
    def load(self) -> int:
        """Restore every stored layer (call once, before serving); returns how many."""
        for stored in self._store.load_all():
            try:
                layer = build_layer(pb.LayerConfig.FromString(stored.config), self.default_device)
                state: dict[str, Any] = dict(stored.tensors)
                if "num_batches_tracked" in layer.state_keys:
                    state["num_batches_tracked"] = np.int64(stored.num_batches_tracked)
                layer.load_state_dict(state)
            except Exception as exc:
                raise RuntimeError(f"cannot restore layer {stored.name!r} from {self._store.path}: {exc}") from exc
            self._entries[stored.name] = _Entry(Snapshot(stored.name, layer, stored.version))
        return len(self._entries)

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
    async def _within(awaitable: Awaitable[T], deadline: float | None, what: str) -> T:
        """Await ``awaitable`` until the loop-time ``deadline``; WaitTimeout after it."""
        if deadline is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise WaitTimeout(
                f"gave up waiting for {what}; nothing was changed. Retry, give the call a longer deadline, "
                "or start the server with a longer --default-deadline"
            ) from None

    async def _compute(
        self, fn: Callable[..., T], *args: Any, deadline: float | None = None, elements: int | None = None
    ) -> T:
        """Run ``fn`` on a kernel thread (inline when it works on at most INLINE_ELEMENTS ``elements``).

        Past ``deadline`` the answer is abandoned (only work that changes
        nothing takes one: reads, and building a layer before it is published).
        """
        if elements is not None and elements <= INLINE_ELEMENTS:
            return fn(*args)
        future = asyncio.get_running_loop().run_in_executor(self._kernels, functools.partial(fn, *args))
        return await self._within(future, deadline, "the kernel threads (the server is busy or the work large)")

    async def _write(self, fn: Callable[..., None], *args: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(self._writer, functools.partial(fn, *args))

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

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise LayerNotFound(check_name(name))
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
    def get(self, name: str) -> Snapshot:
        return self._entry(name).snapshot

    def list(self, prefix: str = "") -> list[Snapshot]:
        # One atomic copy of the entries: metrics scrapes call this from their own thread.
        return [entry.snapshot for name, entry in sorted(self._entries.items()) if name.startswith(prefix)]

    async def create(self, name: str, config: pb.LayerConfig, *, wait: float | None = None) -> tuple[Snapshot, bool]:
        """Create ``name`` (or return it unchanged if it exists with an equal config); True when new."""
        check_name(name)
        deadline = self._deadline(wait)
        layer = await self._compute(build_layer, config, self.default_device, deadline=deadline)
        await self._within(self._names.acquire(), deadline, "other creates and deletes")

        async def create_locked() -> tuple[Snapshot, bool]:
            existing = self._entries.get(name)
            if existing is not None:
                if existing.snapshot.layer.config != layer.config:
                    raise LayerExists(
                        f"layer {name!r} exists with a different config ({existing.snapshot.layer!r}); "
                        "delete it first or choose another name"
                    )
                return existing.snapshot, False
            if self.max_layers is not None and len(self._entries) >= self.max_layers:
                raise TooManyLayers(
                    f"the server holds {len(self._entries)} layers, its limit (--max-layers {self.max_layers}); "
                    "delete layers you no longer need or raise the limit"
                )
            snapshot = Snapshot(name, layer, 1)
            await self._write(
                self._store.create_layer,
                name,
                config.SerializeToString(deterministic=True),
                snapshot.version,
                layer.num_batches_tracked,
                host_state(layer),
            )
            self._entries[name] = _Entry(snapshot)
            return snapshot, True

        return await self._commit([self._names], create_locked)

    async def delete(self, name: str, *, wait: float | None = None) -> Snapshot:
        """Delete ``name`` once its queued writes are done; returns its last snapshot."""
        self._entry(name)  # bad name or NOT_FOUND before queuing
        deadline = self._deadline(wait)
        # Holding the names lock, no create or delete of any name interleaves; the
        # entry is the one the name holds now, not when the call came in.
        await self._within(self._names.acquire(), deadline, "other creates and deletes")
        try:
            entry = self._entry(name)
            await self._within(entry.lock.acquire(), deadline, f"the earlier writes of layer {name!r}")
        except BaseException:
            self._names.release()
            raise

        async def delete_locked() -> Snapshot:
            await self._write(self._store.delete_layer, name)
            entry.deleted = True
            del self._entries[name]
            self.forwards.drop_layer(name)
            return entry.snapshot

        return await self._commit([self._names, entry.lock], delete_locked)

    # ------------------------------------------------------------------ compute
    async def train(
        self, name: str, x: np.ndarray, *, wait: float | None = None, keep_dtype: int | None = None
    ) -> tuple[np.ndarray, Snapshot, str]:
        """Training forward; updates and stores the running statistics atomically.

        With ``keep_dtype`` (x's wire dtype) the forward is kept for a later
        Gradient; the third result is its id ("" when not kept). ``x`` must
        then stay unchanged: the server holds it, not a copy.
        """
        if keep_dtype is not None:
            self.forwards.check_fits(x.nbytes)

        async def work(entry: _Entry) -> tuple[np.ndarray, Snapshot, str]:
            current = entry.snapshot
            layer = current.layer.copy()
            y, report = await self._compute(_train, layer, x, elements=x.size)
            stats = current.stats.after(report)
            if not layer.track_running_stats:  # no state changed: same version, nothing to store
                entry.snapshot = replace(current, stats=stats)
            else:
                snapshot = Snapshot(name, layer, current.version + 1, stats)
                await self._write(
                    self._store.update_state,
                    name,
                    snapshot.version,
                    layer.num_batches_tracked,
                    host_state(layer, _RUNNING_KEYS),
                )
                entry.snapshot = snapshot
            kept = "" if keep_dtype is None else self.forwards.keep(Forward(name, x, keep_dtype, current))
            return y, entry.snapshot, kept

        return await self._with_lock(name, work, wait)

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
    ) -> tuple[np.ndarray, dict[str, np.ndarray | None], Snapshot]:
        """Backward pass on ``snapshot`` (default: the current one); never changes state."""
        snapshot = snapshot or self.get(name)
        dx, grads = await self._compute(
            _backward, snapshot.layer, x, dy, training, deadline=self._deadline(wait), elements=x.size
        )
        return dx, grads, snapshot

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
            snapshot = replace(current, layer=layer, version=current.version + 1)
            changed = tuple(k for k in state if k != "num_batches_tracked")
            await self._write(
                self._store.update_state, name, snapshot.version, layer.num_batches_tracked, host_state(layer, changed)
            )
            entry.snapshot = snapshot
            return snapshot

        return await self._with_lock(name, work, wait)
