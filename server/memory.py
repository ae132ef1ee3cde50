"""Give freed tensor memory back to the operating system.

Two behaviours of glibc's malloc keep memory a finished call freed:

* It serves a large block with a mapping of its own (returned on free) only
  above a threshold that it raises to the largest block freed so far (up to
  32 MiB). After a few tensor-sized requests, blocks of several MiB come from
  per-thread heaps instead, and what they free stays resident. A fixed
  threshold turns that adjustment off (:func:`return_freed_memory`).
* gRPC receives a message as many small pieces (one per HTTP/2 frame), from
  the heaps of its threads; freed, they leave the heaps fragmented, and only
  ``malloc_trim`` hands such memory back. :class:`Trimmer` calls it, off the
  event loop, once a few seconds after calls have moved enough bytes.

Elsewhere (musl, macOS) both are no-ops: that C library decides.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD_BYTES", "Trimmer", "return_freed_memory"]

log = logging.getLogger(__name__)

#: Blocks from this size up get a mapping of their own (glibc's starting value is 128 KiB).
MMAP_THRESHOLD_BYTES = 256 << 10
#: Free memory at the top of a heap beyond this goes back (glibc raises it with the threshold).
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers, from glibc's malloc.h


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- glibc has both
    except (OSError, AttributeError, TypeError):
        return None
    return libc


_LIBC = _libc()


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (True), or do nothing where the C library is not glibc (False)."""
    if _LIBC is None:
        log.debug("the C library has no mallopt: freed memory is returned as it decides")
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


class Trimmer:
    """Trims the heaps every ``interval`` seconds in which calls moved at least ``after_bytes``."""

    def __init__(self, interval: float = 2.0, after_bytes: int = 32 << 20) -> None:
        self.interval = interval
        self.after_bytes = after_bytes
        self._moved = 0

    def moved(self, nbytes: int) -> None:
        """Count the bytes a finished call received and sent."""
        self._moved += nbytes

    async def run(self) -> None:
        """Trim until cancelled (a no-op task where the C library is not glibc)."""
        while _LIBC is not None:
            await asyncio.sleep(self.interval)
            if self._moved >= self.after_bytes:
                self._moved = 0
                await asyncio.to_thread(_LIBC.malloc_trim, 0)
