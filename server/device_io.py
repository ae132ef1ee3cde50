"""Moving request tensors to a layer's device and results back.

CPU layers compute on the request's arrays directly. CUDA layers get, per
kernel thread, one non-blocking CUDA stream and reusable page-locked (pinned)
staging buffers: a request's copies and kernels queue on its thread's stream,
so requests on different threads overlap (copies in one, kernels in
another), and a copy from pinned memory runs at full PCIe/NVLink speed
without the driver staging it again. A session ends with its stream
synchronized, so whatever it produced (results, new running statistics) is
complete before another thread or stream can see it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from normkernels.backend import Device

#: Tensors above this size are copied from pageable memory: a pinned buffer
#: per kernel thread and slot would hold this much page-locked memory for good.
PINNED_MAX_BYTES = 256 << 20


class _HostIO:
    """CPU layers: nothing to move."""

    @staticmethod
    def to_device(array: np.ndarray) -> np.ndarray:
        return array

    @staticmethod
    def to_host(array: Any) -> np.ndarray:
        return np.asarray(array)


class _CudaIO:
    """One kernel thread's stream and pinned staging buffers on one device."""

    def __init__(self, device: Device) -> None:
        import cupy

        self._cupy = cupy
        self.device = cupy.cuda.Device(device.index)
        with self.device:
            self.stream = cupy.cuda.Stream(non_blocking=True)
        self._buffers: list[Any] = []  # pinned memory per slot, grown on demand
        self._next_slot = 0

    @contextlib.contextmanager
    def session(self) -> Iterator[_CudaIO]:
        self._next_slot = 0
        with self.device, self.stream:
            try:
                yield self
            finally:
                self.stream.synchronize()

    def _staging(self, nbytes: int) -> np.ndarray | None:
        """A pinned byte buffer of at least ``nbytes`` for this session's next transfer (None when too big)."""
        if nbytes > PINNED_MAX_BYTES:
            return None
        slot = self._next_slot
        self._next_slot += 1
        if slot == len(self._buffers):
            self._buffers.append(None)
        memory = self._buffers[slot]
        if memory is None or memory.size() < nbytes:
            memory = self._buffers[slot] = self._cupy.cuda.alloc_pinned_memory(max(nbytes, 1 << 20))
        return np.frombuffer(memory, dtype=np.uint8, count=nbytes)

    def to_device(self, array: np.ndarray) -> Any:
        staging = self._staging(array.nbytes)
        if staging is None:
            return self._cupy.asarray(array)
        host = staging.view(array.dtype).reshape(array.shape)
        np.copyto(host, array)
        device = self._cupy.empty(array.shape, dtype=array.dtype)
        device.set(host, stream=self.stream)  # asynchronous: the staging slot is not reused this session
        return device

    def to_host(self, array: Any) -> np.ndarray:
        if not isinstance(array, self._cupy.ndarray):
            return np.asarray(array)
        staging = self._staging(array.nbytes)
        if staging is None:
            return array.get(stream=self.stream)
        host = staging.view(array.dtype).reshape(array.shape)
        array.get(stream=self.stream, out=host)
        self.stream.synchronize()
        return host.copy()  # the staging buffer is reused by the next request


_local = threading.local()


def session(device: Device) -> contextlib.AbstractContextManager:
    """``with session(layer.device) as io``: ``io.to_device(array)``, compute, ``io.to_host(result)``."""
    if device.kind == "cpu":
        return contextlib.nullcontext(_HostIO)
    ios = _local.__dict__.setdefault("cuda", {})
    io = ios.get(device.index)
    if io is None:
        io = ios[device.index] = _CudaIO(device)
    return io.session()
