"""System shared memory (after Triton's extension): regions clients on this host register by name.

A region is a byte range of a POSIX shared-memory object, mapped once at
registration. Tensors in requests reference (region, offset, byte_size) and
are read in place; outputs can be written into a region. Every reference is
checked against the region, and the region against the object's current
size (a client that shrinks its object gets an error, not a crash).

Off unless the server runs with ``--shared-memory``: with it, any client that
may call the server can read and write any shared-memory object the server's
user can open, so it is for trusted clients on the same host only.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
from dataclasses import dataclass

from normserve.server.errors import InvalidRequest, RegionExists, RegionNotFound, SharedMemoryOff
from normserve.server.layer_config import check_name
from normserve.v1 import normalization_pb2 as pb

__all__ = ["Region", "SharedMemoryRegions"]

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory objects (shm_open's namespace)
_KEY = re.compile(r"/?[A-Za-z0-9_.:-]{1,250}")


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    memory: mmap.mmap
    writable: bool

    def describe(self) -> pb.SharedMemoryRegion:
        return pb.SharedMemoryRegion(name=self.name, key=self.key, offset=self.offset, byte_size=self.byte_size)

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # a call still uses it: the mapping goes with its last view
            self.memory.close()


class SharedMemoryRegions:
    """The registered regions of one server."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._regions: dict[str, Region] = {}

    def _require_enabled(self) -> None:
        if not self.enabled:
            raise SharedMemoryOff(
                "shared memory is off on this server; start it with --shared-memory "
                "(for clients on the same host), or send the tensor's bytes"
            )

    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        self._require_enabled()
        check_name(name, "name")
        if not _KEY.fullmatch(key):
            raise InvalidRequest(
                f"key {key!r} is not a POSIX shared-memory name: '/' (optional) then 1-250 of [A-Za-z0-9_.:-]"
            )
        if byte_size <= 0:
            raise InvalidRequest("byte_size must be > 0: the length of the region in bytes")
        existing = self._regions.get(name)
        if existing is not None:
            if (existing.key, existing.offset, existing.byte_size) == (key, offset, byte_size):
                return existing
            raise RegionExists(
                f"region {name!r} is registered with key {existing.key!r}, offset {existing.offset}, "
                f"byte_size {existing.byte_size}; unregister it first or choose another name"
            )
        path = os.path.join(SHM_DIR, key.lstrip("/"))
        writable = True
        try:
            fd = os.open(path, os.O_RDWR)
        except PermissionError:
            fd, writable = os.open(path, os.O_RDONLY), False
        except FileNotFoundError:
            raise InvalidRequest(
                f"no shared-memory object {key!r} on the server's host; create it first (shm_open, or "
                "multiprocessing.shared_memory) on the same host as the server"
            ) from None
        except OSError as exc:
            raise InvalidRequest(f"cannot open shared-memory object {key!r}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if offset + byte_size > size:
                raise InvalidRequest(
                    f"offset {offset} + byte_size {byte_size} is beyond the end of {key!r} ({size} bytes)"
                )
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            memory = mmap.mmap(fd, size, access=access)
        except BaseException:
            os.close(fd)
            raise
        region = Region(name, key, offset, byte_size, fd, memory, writable)
        self._regions[name] = region
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

    def view(self, ref: pb.SharedMemoryRef, what: str, *, writable: bool = False) -> memoryview:
        """The bytes ``ref`` names, after checking it against its region and the object's size."""
        self._require_enabled()
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidRequest(
                f"{what}.region {ref.region!r} is not registered; register it with RegisterSharedMemory "
                "(ListSharedMemory shows what is)"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidRequest(
                f"{what} [{ref.offset}, {ref.offset + ref.byte_size}) reaches beyond region {region.name!r} "
                f"({region.byte_size} bytes)"
            )
        if writable and not region.writable:
            raise InvalidRequest(f"{what}: region {region.name!r} is read-only to the server; it cannot hold outputs")
        start = region.offset + ref.offset
        if start + ref.byte_size > os.fstat(region.fd).st_size:
            raise InvalidRequest(
                f"{what}: shared-memory object {region.key!r} shrank below the registered region; register it again"
            )
        return memoryview(region.memory)[start : start + ref.byte_size]
