"""A cold kernel cache filled by several processes at once: a first start compiles on every core.

Numba compiles on one thread, and a first start compiles every kernel
signature (minutes on a small machine). :func:`fill_cache` hands the kernels
whose cache entries are missing to helper processes (:func:`serve`), one
kernel at a time to whichever is free, each compiling into the shared on-disk
cache. Then :func:`normkernels.compiled.warm_up` loads them all from there,
as on any later start. A kernel is the unit (both its signatures in one
process) because numba keeps one index file per kernel: two processes adding
signatures to the same index could each drop the other's.

Nothing here is needed for correctness: a kernel a helper did not finish
(it failed, or could not start) is compiled by ``warm_up`` itself, as it
would be without helpers. A helper ends when its parent does, however the
parent ends: it exits once its parent process is gone.

``NORMKERNELS_COMPILE_PROCESSES`` sets how many helpers a cold start uses
(default: one per core, at most :data:`MOST_PROCESSES`; 1 compiles in the
starting process alone).
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

__all__ = ["ENV_PROCESSES", "MOST_PROCESSES", "Filled", "fill_cache", "missing", "processes"]

ENV_PROCESSES = "NORMKERNELS_COMPILE_PROCESSES"
#: A numba compile holds about 300 MB: more helpers than this gain little and cost memory.
MOST_PROCESSES = 4
#: A helper that has not compiled a kernel after this long (seconds) is killed and its kernel left to warm_up
#: (the longest takes 20 s alone on a 2-core machine, minutes under heavy load).
KERNEL_SECONDS = 900.0
#: How often a helper checks that its parent is still there (seconds).
_PARENT_CHECK_SECONDS = 0.2


def processes() -> int:
    """How many processes a cold start compiles in (NORMKERNELS_COMPILE_PROCESSES, else one per core, at most 4)."""
    text = os.environ.get(ENV_PROCESSES, "").strip()
    if not text:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, min(cores, MOST_PROCESSES))
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"{ENV_PROCESSES}={text!r}: expected a positive integer")
    return count


def _index_file(kernel: object) -> Path | None:
    """Where numba keeps ``kernel``'s index of cached signatures (None if this numba does not say)."""
    path = getattr(getattr(getattr(kernel, "_cache", None), "_cache_file", None), "_index_path", None)
    return None if path is None else Path(path)


def missing(kernels: ModuleType) -> list[str]:
    """The kernels of ``kernels`` (normkernels.cpu_kernels) with no cache entry at all: those a start compiles.

    A kernel whose index exists but is stale (its source changed) counts as cached: ``warm_up`` then
    compiles it itself, as it would without helpers.
    """
    found = {name: _index_file(kernel) for name, kernel in kernels.KERNELS.items()}
    return [name for name, index in found.items() if index is not None and not index.exists()]


class Filled(NamedTuple):
    """What :func:`fill_cache` did."""

    compiled: list[str]  # the kernels the helpers compiled
    helpers: int  # how many helper processes compiled at least one of them


def fill_cache(names: Iterable[str], count: int) -> Filled:
    """Compile the kernels ``names`` into the cache in up to ``count`` helper processes, waiting for them."""
    work = collections.deque(names)
    count = min(count, len(work))
    compiled: list[str] = []
    if count < 1:
        return Filled(compiled, 0)
    lock = threading.Lock()

    def next_kernel() -> str | None:
        with lock:
            return work.popleft() if work else None

    # `python -c` puts its working folder first on sys.path: run it in the folder that holds the normkernels
    # package this process imported, so that the helpers import the same code (and compile into the cache
    # of that code), never a package of the same name where the server happened to start.
    home = Path(__file__).resolve().parents[1]
    helpers: list[subprocess.Popen[str]] = []
    for _ in range(count):
        try:
            helpers.append(
                subprocess.Popen(
                    [sys.executable, "-c", f"from {__name__} import serve; serve({os.getpid()})"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=home,
                )
            )
        except OSError:
            break  # warm_up compiles what no helper did
    # One thread per helper feeds it a kernel at a time. Daemon threads: a parent that stops while its
    # helpers compile exits at once, and the helpers follow (see serve).
    answered: list[str] = []
    feeders = [
        threading.Thread(target=_feed, args=(helper, next_kernel, compiled.append, answered.append), daemon=True)
        for helper in helpers
    ]
    for feeder in feeders:
        feeder.start()
    for feeder in feeders:
        feeder.join()
    return Filled(compiled, len(answered))


def _feed(
    helper: subprocess.Popen[str],
    next_kernel: Callable[[], str | None],
    done: Callable[[str], None],
    answered: Callable[[str], None],
) -> None:
    """Hand ``helper`` one kernel at a time until there are none left, or it dies or takes longer than
    KERNEL_SECONDS over one (then it is killed): warm_up compiles what is left of its share."""
    assert helper.stdin is not None
    assert helper.stdout is not None
    first = True
    try:
        while (name := next_kernel()) is not None:
            helper.stdin.write(name + "\n")
            helper.stdin.flush()
            timer = threading.Timer(KERNEL_SECONDS, helper.kill)
            timer.daemon = True
            timer.start()
            try:
                line = helper.stdout.readline()
            finally:
                timer.cancel()
            if line.strip() != name:
                return
            done(name)
            if first:
                answered(name)
                first = False
    except OSError:  # a broken pipe: the helper died
        return
    finally:
        for stream in (helper.stdin, helper.stdout):
            with contextlib.suppress(OSError):
                stream.close()
        helper.wait()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_SECONDS)
    os._exit(1)


def serve(parent: int) -> None:
    """A helper process's body: compile each kernel named on stdin (both its signatures) into the cache,
    then answer its name on stdout."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent's to handle
    from normkernels import compiled

    kernels = compiled.kernels()
    if kernels is None:
        return
    for line in sys.stdin:
        name = line.strip()
        for signature in kernels.SIGNATURES[name]:
            kernels.KERNELS[name].compile(signature)
        print(name, flush=True)
