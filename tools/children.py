"""Child processes that end when their parent ends, however it ends.

Every process that ``normserve cluster``, ``normserve bench``, the benchmarks
and the tests start goes through :func:`popen` (or calls
:func:`end_with_parent` first thing, for a multiprocessing child):

- On Linux the child asks the kernel for a *parent-death signal*
  (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): when the thread that started it
  exits, it gets SIGTERM, which a server answers with its graceful shutdown.
  That covers the parent's SIGKILL and crashes, which no handler of the
  parent's sees. The thread matters: start children from a thread that
  lives as long as they should (the main thread, here).
- At the parent's normal exit (and, with :func:`exit_on_signals`, at SIGTERM
  or SIGHUP, which then unwind like Ctrl-C), the children still running are
  sent SIGTERM, then SIGKILL after a grace, by an atexit hook.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

__all__ = ["end_with_parent", "exit_on_signals", "popen", "stop_all"]

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(None, use_errno=True).prctl  # resolved here: nothing to load between fork and exec
    return None


_PRCTL = _prctl()
#: Children started by popen() and not yet seen to exit.
_RUNNING: weakref.WeakSet[subprocess.Popen] = weakref.WeakSet()


def end_with_parent(parent: int | None = None, signum: int = signal.SIGTERM) -> None:
    """Have this process get ``signum`` when its parent (the thread that started it) exits.

    ``parent``: the pid this process was started by; when it is gone already (it died before the request
    took hold), the signal comes now.
    """
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)


def popen(command: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen(command, **kwargs)`` for a child that ends with this process (see the module doc)."""
    parent = os.getpid()
    if "preexec_fn" in kwargs:
        raise TypeError("popen sets preexec_fn itself")
    process = subprocess.Popen(command, preexec_fn=lambda: end_with_parent(parent), **kwargs)
    _RUNNING.add(process)
    return process


def stop_all(grace: float = 10.0) -> None:
    """SIGTERM every child popen() started that still runs; SIGKILL what still runs ``grace`` seconds later."""
    running = [process for process in list(_RUNNING) if process.poll() is None]
    for process in running:
        with contextlib.suppress(OSError):
            process.terminate()
    deadline = time.monotonic() + grace
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                process.kill()
            process.wait()


atexit.register(stop_all)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_signals(*signums: int) -> None:
    """SIGTERM and SIGHUP (or ``signums``) end this program as Ctrl-C does, unwinding: ``finally`` blocks and
    context managers stop what they started, then the atexit hook stops any child left. Main thread only."""
    for signum in signums or (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit)
