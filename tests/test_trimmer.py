"""The heap trimmer hands back memory that calls freed, including memory a call still held when it trimmed.

The real Trimmer, the real C library and this process's own resident set: memory freed in the middle of the
heap (a live allocation above it) stays resident until ``malloc_trim``.
"""

from __future__ import annotations

import asyncio

import pytest
from serverproc import patience

from normserve.server.memory import Trimmer, resident_bytes

MiB = 1 << 20
pytestmark = pytest.mark.skipif(Trimmer()._trim is None or resident_bytes() is None, reason="needs glibc and /proc")


def test_memory_a_call_held_during_a_trim_is_trimmed_once_the_call_ends() -> None:
    """A trim in a quiet second of a long call took the call's buffers for the floor: once the call freed
    them, the process held no more than floor + 32 MiB, so no trim came and 140 MB stayed resident."""

    async def scenario() -> tuple[int, int]:
        trimmer = Trimmer(interval=0.05)
        running = asyncio.create_task(trimmer.run())
        try:
            trimmer.started()  # a long call: nothing ends while it holds its buffers
            buffers = [bytes(8192) for _ in range((200 * MiB) // 8192)]  # the heap's, not mmap's (< 128 KiB)
            pinned = [bytes(4096) for _ in range(64)]  # above them: freeing them cannot shrink the heap's top
            await asyncio.sleep(patience(0.05))  # quiet seconds with the call in progress: the trimmer trims
            held = resident_bytes()
            del buffers
            trimmer.ended(200 * MiB)
            deadline = asyncio.get_running_loop().time() + patience(0.3)
            while resident_bytes() > held - 150 * MiB and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
            assert pinned  # alive until here
            return held, resident_bytes()
        finally:
            running.cancel()

    held, after = asyncio.run(scenario())
    assert after < held - 150 * MiB, f"{(held - after) >> 20} MiB of 200 given back"
