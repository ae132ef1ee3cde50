"""Where a call's time goes: waiting for a layer's earlier writes or a free thread (queue), kernels (compute),
SQLite (store), and the other ranks of a synchronized step (sync).

Each call has an account in a context variable: :class:`~normserve.server.interceptors.GuardCalls` opens it
when the call starts (asyncio tasks the call starts share it) and hands it to the metrics when the call ends.
Code that waits or works says for which phase; outside a call nothing is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Executor
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["PHASES", "add", "run_in", "start_call", "timed"]

T = TypeVar("T")
PHASES = ("queue", "compute", "store", "sync")
_account: ContextVar[dict[str, float] | None] = ContextVar("normserve_call_phases", default=None)


def start_call() -> dict[str, float]:
    """A fresh account of phase -> seconds for the call running in this context."""
    account: dict[str, float] = {}
    _account.set(account)
    return account


def add(phase: str, seconds: float) -> None:
    account = _account.get()
    if account is not None:
        account[phase] = account.get(phase, 0.0) + seconds


@contextlib.contextmanager
def timed(phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        add(phase, time.perf_counter() - start)


def _timed(work: Callable[[], T], ran: list[float]) -> T:
    """``work()``, its duration appended to ``ran``. A module function, not a closure: nothing of a failed
    call's work outlives it through a function object (its frames are cleared, see GuardCalls)."""
    begun = time.perf_counter()
    try:
        return work()
    finally:
        ran.append(time.perf_counter() - begun)


async def run_in(
    executor: Executor,
    work: Callable[[], T],
    phase: str,
    wait: Callable[[Awaitable[T]], Awaitable[T]] = lambda future: future,
) -> T:
    """``work()`` on ``executor``, awaited through ``wait``: its run counts as ``phase``, the time it waited
    for a thread (or was abandoned by ``wait``) as queue."""
    started = time.perf_counter()
    ran: list[float] = []
    try:
        return await wait(asyncio.get_running_loop().run_in_executor(executor, _timed, work, ran))
    finally:
        total = time.perf_counter() - started
        busy = min(ran[0], total) if ran else 0.0
        add(phase, busy)
        add("queue", total - busy)
