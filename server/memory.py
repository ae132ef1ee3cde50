"""Give memory that calls freed back to the operating system once traffic quiets.

gRPC receives a message as many small pieces (one per HTTP/2 frame) from
the heaps of its threads, and NumPy's temporaries come and go from the same
heaps. Freed, that memory stays resident in fragmented heaps: after a burst
of large calls, refused ones included, an idle server kept hundreds of MB.
Only glibc's ``malloc_trim`` hands such memory back. :class:`Trimmer` calls
it off the event loop, after a quiet second, when the process holds enough
more than after its last trim; under steady load it does nothing (the memory
is in use again at once, and trimming would only cost). It watches what the
process holds (its resident set), not what calls moved: calls that never
reach a handler (refused inside gRPC, or sending only their headers) leave
memory behind too. Where the C library is not glibc it is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

__all__ = ["Trimmer"]

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows
        return None


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """What this process holds in memory now (Linux), None where that cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class Trimmer:
    """Trims the heaps after an ``interval`` without finished calls, when the process holds at least
    ``after_bytes`` more than after its last trim. It hears of each call through :meth:`started` and
    :meth:`ended` (a :class:`normserve.server.interceptors.CallListener`)."""

    def __init__(self, interval: float = 1.0, after_bytes: int = 32 << 20) -> None:
        self.interval = interval
        self.after_bytes = after_bytes
        self._recent = 0  # calls finished in the current interval
        self._busy = 0  # calls in progress
        self._trim = _malloc_trim()
        self._floor = resident_bytes()  # what the process held after the last trim (or at start)
        #: The floor from before a trim made while calls were in progress (None: no such trim since).
        self._idle_floor: int | None = None

    def started(self) -> None:
        """Hear that a call started."""
        self._busy += 1

    def ended(self, nbytes: int) -> None:
        """Hear that a call ended (it received and sent ``nbytes``)."""
        self._recent += 1
        self._busy -= 1
        if self._busy == 0 and self._idle_floor is not None:
            # A trim during a call (a quiet second: none ended) took that call's buffers, then in use, for the
            # floor, and what the call left once it ended stayed under floor + after_bytes: resident for good
            # (seen: +140 MB after six refused 128 MiB Infers). With no call in progress, the floor from before
            # that trim holds again, so the next quiet second trims what the calls left.
            self._floor, self._idle_floor = self._idle_floor, None

    async def run(self) -> None:
        """Trim until cancelled."""
        while self._trim is not None and self._floor is not None:
            await asyncio.sleep(self.interval)
            quiet, self._recent = self._recent == 0, 0
            held = resident_bytes()
            if held is None:
                continue
            self._floor = min(self._floor, held)  # memory given back by itself lowers the mark
            if quiet and held >= self._floor + self.after_bytes:
                during_call = self._busy > 0  # taken before the trim: a call may end while it runs
                try:
                    await asyncio.to_thread(self._trim, 0)
                except Exception:  # never fatal: the memory merely stays
                    log.exception("malloc_trim failed")
                if during_call and not self._busy:
                    continue  # the calls it ran beside have ended: what they left, the next quiet second trims
                if self._busy and self._idle_floor is None:
                    self._idle_floor = self._floor
                # What is still held after a trim is in use: the next trim waits until it grows again.
                self._floor = resident_bytes() or held
