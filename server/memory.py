"""Give memory that calls freed back to the operating system once traffic quiets.

gRPC receives a message as many small pieces (one per HTTP/2 frame) from
the heaps of its threads, and NumPy's temporaries come and go from the same
heaps. Freed, that memory stays resident in fragmented heaps: after a burst
of large calls, refused ones included, an idle server kept hundreds of MB.
Only glibc's ``malloc_trim`` hands such memory back. :class:`Trimmer` calls
it off the event loop, after a quiet second that followed enough traffic;
under steady load it does nothing (the memory is in use again at once, and
trimming would only cost). Where the C library is not glibc it is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

__all__ = ["Trimmer"]

log = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows
        return None


class Trimmer:
    """Trims the heaps after an ``interval`` without calls that followed at least ``after_bytes`` of traffic."""

    def __init__(self, interval: float = 1.0, after_bytes: int = 32 << 20) -> None:
        self.interval = interval
        self.after_bytes = after_bytes
        self._since_trim = 0  # bytes calls moved since the last trim
        self._recent = 0  # ... and in the current interval
        self._trim = _malloc_trim()

    def moved(self, nbytes: int) -> None:
        """Count the bytes a finished call received and sent."""
        self._since_trim += nbytes
        self._recent += nbytes

    async def run(self) -> None:
        """Trim until cancelled."""
        while self._trim is not None:
            await asyncio.sleep(self.interval)
            quiet, self._recent = self._recent == 0, 0
            if quiet and self._since_trim >= self.after_bytes:
                self._since_trim = 0
                try:
                    await asyncio.to_thread(self._trim, 0)
                except Exception:  # never fatal: the memory merely stays
                    log.exception("malloc_trim failed")
