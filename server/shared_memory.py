"""System shared memory (after Triton's extension): regions clients on this host register by name.

A region is a byte range of a POSIX shared-memory object in ``/dev/shm``.
Tensors in requests reference (region, offset, byte_size); outputs can be
written into a region. The server reads and writes a region through its file
descriptor (``preadv``/``pwritev``), never through a mapping: a client that
truncates its object while the server works on it then gets an error, where
a mapping would kill the server with SIGBUS. It costs one copy of the
elements, into memory the server owns, which also means a request's input
can never change under the kernels.

Objects are opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be regular
files: a symbolic link (to a file the server may read or write) and a FIFO
(whose open would block) are refused. Opening and large transfers run off
the event loop.

Each registration holds a file descriptor, so registrations are bounded: in
all (``--max-shared-memory-regions``), per client (its connection,
``--max-shared-memory-regions-per-client``), and by the descriptors left
under the process's RLIMIT_NOFILE, of which :data:`normserve.server.transport.RESERVED_DESCRIPTORS`
(or a quarter, whichever is more) stay free for accepting connections and
the state database: a client cannot lock others out by registering one
object under many names.

Off unless the server runs with ``--shared-memory``: with it, any client that
may call the server can read and write any shared-memory object in
``/dev/shm`` that the server's user can open, so it is for trusted clients on
the same host only.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from normserve.server.errors import InvalidRequest, RegionExists, RegionNotFound, SharedMemoryOff, TooManyRegions
from normserve.server.layer_config import check_name
from normserve.server.transport import RESERVED_DESCRIPTORS
from normserve.v1 import normalization_pb2 as pb

__all__ = ["Region", "SharedMemoryRegions"]

T = TypeVar("T")
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory objects (shm_open's namespace)
_KEY = re.compile(r"/?[A-Za-z0-9_.:-]{1,250}")
#: Transfers up to this many bytes run on the event loop (a thread hop costs more than the copy).
INLINE_BYTES = 1 << 20
_FD_DIR = "/proc/self/fd"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    writable: bool
    client: str = ""  # who registered it (its connection), for the per-client budget

    def describe(self) -> pb.SharedMemoryRegion:
        return pb.SharedMemoryRegion(name=self.name, key=self.key, offset=self.offset, byte_size=self.byte_size)

    def close(self) -> None:
        os.close(self.fd)


async def _off_loop(nbytes: int, fn: Callable[..., T], region: Region, *args: object) -> T:
    """``fn(fd, *args)`` on a descriptor of ``region``'s object of this transfer's own, duplicated here on the
    event loop: unregistering the region (closing its fd) during the transfer cannot make it read or write
    whatever file reuses that number. Large transfers run on a thread."""
    fd = os.dup(region.fd)
    try:
        return fn(fd, *args) if nbytes <= INLINE_BYTES else await asyncio.to_thread(fn, fd, *args)
    finally:
        os.close(fd)


def _open_object(key: str) -> tuple[int, bool]:
    """(fd, writable) of the shared-memory object ``key``: a regular file in SHM_DIR, never a link or a FIFO."""
    path = os.path.join(SHM_DIR, key.lstrip("/"))
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd, writable = os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            fd, writable = os.open(path, os.O_RDONLY | flags), False
    except FileNotFoundError:
        raise InvalidRequest(
            f"no shared-memory object {key!r} on the server's host; create it first (shm_open, or "
            "multiprocessing.shared_memory) on the same host as the server"
        ) from None
    except OSError as exc:
        if os.path.islink(path):
            raise InvalidRequest(
                f"shared-memory object {key!r} is a symbolic link; register the object itself"
            ) from None
        raise InvalidRequest(f"cannot open shared-memory object {key!r}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InvalidRequest(f"{key!r} in {SHM_DIR} is not a regular file, so it is not a shared-memory object")
    return fd, writable


def _read(fd: int, start: int, size: int) -> tuple[np.ndarray, int]:
    buffer = np.empty(size, np.uint8)
    return buffer, os.preadv(fd, [buffer], start) if size else 0


def _write(fd: int, start: int, data: memoryview) -> int:
    """Bytes written; -1 when the object is too short to hold them. (A write past the end would grow the
    object again; one that shrinks it during the write gets its bytes back that way, which harms no one.)"""
    if os.fstat(fd).st_size < start + data.nbytes:
        return -1
    return os.pwritev(fd, [data], start) if data.nbytes else 0


class SharedMemoryRegions:
    """The registered regions of one server."""

    def __init__(self, enabled: bool, max_regions: int = 1024, max_regions_per_client: int = 256) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
        self.max_regions_per_client = max_regions_per_client
        self._regions: dict[str, Region] = {}

    def _check_room(self, client: str) -> None:
        """Refuse (RESOURCE_EXHAUSTED) a new registration over a budget: regions in all, the client's, or the
        descriptors the process may still open beyond those kept for connections."""
        if len(self._regions) >= self.max_regions:
            raise TooManyRegions(
                f"the server holds {len(self._regions)} shared-memory regions, its limit "
                "(--max-shared-memory-regions); unregister regions you no longer use"
            )
        held = sum(region.client == client for region in self._regions.values())
        if held >= self.max_regions_per_client:
            raise TooManyRegions(
                f"this client holds {held} shared-memory regions, the limit per client "
                "(--max-shared-memory-regions-per-client); unregister regions you no longer use"
            )
        free, reserved = _descriptors_free()
        if free is not None and free <= reserved:
            raise TooManyRegions(
                f"the server has {free} file descriptors left under its RLIMIT_NOFILE and keeps {reserved} for "
                "connections; unregister regions, or raise the server's descriptor limit (ulimit -n)"
            )

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryOff(
                "shared memory is off on this server; start it with --shared-memory "
                "(for clients on the same host), or send the tensor's bytes"
            )

    def _registered(self, name: str, key: str, offset: int, byte_size: int) -> Region | None:
        """The region already under ``name`` if it is this one; ALREADY_EXISTS if another."""
        existing = self._regions.get(name)
        if existing is None or (existing.key, existing.offset, existing.byte_size) == (key, offset, byte_size):
            return existing
        raise RegionExists(
            f"region {name!r} is registered with key {existing.key!r}, offset {existing.offset}, "
            f"byte_size {existing.byte_size}; unregister it first or choose another name"
        )

    async def register(self, name: str, key: str, offset: int, byte_size: int, client: str = "") -> Region:
        """Register region ``name``, held by ``client`` (any string naming who asked; budgets count per client)."""
        self._require_enabled()
        check_name(name, "name")
        if not _KEY.fullmatch(key):
            raise InvalidRequest(
                f"key {key[:64]!r} is not a POSIX shared-memory name: '/' (optional) then 1-250 of [A-Za-z0-9_.:-]"
            )
        if byte_size <= 0:
            raise InvalidRequest("byte_size must be > 0: the length of the region in bytes")
        existing = self._registered(name, key, offset, byte_size)
        if existing is not None:
            return existing
        self._check_room(client)
        fd, writable = await asyncio.to_thread(_open_object, key)
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidRequest(
                    f"offset {offset} + byte_size {byte_size} is beyond the end of {key!r} ({size} bytes)"
                )
            existing = self._registered(name, key, offset, byte_size)  # another call may have won the race
            if existing is None:
                self._check_room(client)  # ... or taken the room while the object was opened
        except BaseException:
            os.close(fd)
            raise
        if existing is not None:
            os.close(fd)
            return existing
        region = self._regions[name] = Region(name, key, offset, byte_size, fd, writable, client)
        return region

    def unregister(self, name: str) -> list[Region]:
        """Unregister ``name`` (every region when empty); the regions unregistered."""
        self._require_enabled()
        if name:
            if name not in self._regions:
                raise RegionNotFound(check_name(name, "name"))
            names = [name]
        else:
            names = sorted(self._regions)
        regions = [self._regions.pop(n) for n in names]
        for region in regions:
            region.close()
        return regions

    def list(self) -> list[Region]:
        self._require_enabled()
        return [self._regions[name] for name in sorted(self._regions)]

    def close(self) -> None:
        for region in self._regions.values():
            region.close()
        self._regions.clear()

    def _locate(self, ref: pb.SharedMemoryRef, what: str, writable: bool) -> tuple[Region, int]:
        """The region ``ref`` names and where its range starts in the object, after checking the range."""
        self._require_enabled()
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidRequest(
                f"{what}.region {ref.region[:64]!r} is not registered; register it with RegisterSharedMemory "
                "(ListSharedMemory shows what is)"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidRequest(
                f"{what} [{ref.offset}, {ref.offset + ref.byte_size}) reaches beyond region {region.name!r} "
                f"({region.byte_size} bytes)"
            )
        if writable and not region.writable:
            raise InvalidRequest(f"{what}: region {region.name!r} is read-only to the server; it cannot hold outputs")
        return region, region.offset + ref.offset

    def _shrank(self, region: Region, what: str) -> InvalidRequest:
        return InvalidRequest(
            f"{what}: shared-memory object {region.key!r} shrank below the registered region while the server "
            "used it; keep it whole while calls use it, or register it again"
        )

    async def read(self, ref: pb.SharedMemoryRef, what: str) -> np.ndarray:
        """A copy of the bytes ``ref`` names, in memory of the server's own."""
        region, start = self._locate(ref, what, writable=False)
        data, got = await _off_loop(ref.byte_size, _read, region, start, ref.byte_size)
        if got != ref.byte_size:
            raise self._shrank(region, what)
        return data

    def output(self, ref: pb.SharedMemoryRef, what: str, needed: int) -> pb.SharedMemoryRef:
        """The range an output of ``needed`` bytes goes to (what the answer names), checked before any work."""
        self._locate(ref, what, writable=True)
        if ref.byte_size < needed:
            raise InvalidRequest(f"{what}.byte_size {ref.byte_size} cannot hold the output: it needs {needed} bytes")
        return pb.SharedMemoryRef(region=ref.region, offset=ref.offset, byte_size=needed)

    async def write(self, place: pb.SharedMemoryRef, data: np.ndarray, what: str) -> None:
        """Write ``data`` (C-contiguous, ``place.byte_size`` bytes) into the range :meth:`output` gave."""
        region, start = self._locate(place, what, writable=True)  # still registered, still in range
        flat = memoryview(data.reshape(-1).view(np.uint8))
        if await _off_loop(flat.nbytes, _write, region, start, flat) != flat.nbytes:
            raise self._shrank(region, what)


def _descriptors_free() -> tuple[int | None, int]:
    """(descriptors the process may still open, or None when that is not known; how many to keep free).

    Registrations never take the descriptors the transport keeps out of its connection budget (or a quarter
    of the limit, if more): room for accepting connections, the state database, and transfers' duplicates."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None, RESERVED_DESCRIPTORS
    try:
        used = len(os.listdir(_FD_DIR))
    except OSError:  # no /proc: the budgets above bound registrations alone
        return None, RESERVED_DESCRIPTORS
    return soft - used, max(RESERVED_DESCRIPTORS, soft // 4)
