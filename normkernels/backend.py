"""Devices, array namespaces, dtype policy and fast reductions.

The math in ``core`` is written once against an array namespace ``xp``: NumPy
for ``device="cpu"``, CuPy for ``device="cuda[:k]"``. This module is the only
place that knows how to pick one, and how to make reductions fast on both:
a sum over the trailing (contiguous) axes is a matrix-vector product with a
ones vector, which BLAS runs at memory speed and with several threads.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from normkernels.errors import DeviceError, DTypeError

try:  # CuPy is the optional ``gpu`` extra.
    import cupy
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None

Array = Any  # numpy.ndarray or cupy.ndarray

#: Input dtypes a layer accepts; anything else is refused with DTypeError.
INPUT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: Dtypes a layer may keep its parameters and running statistics in.
PARAM_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """Where a layer keeps its state and runs: ``cpu`` or ``cuda:index``."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def cuda_device_count() -> int:
    """How many CUDA devices CuPy can use (0 without CuPy, a driver or a GPU)."""
    if cupy is None:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no driver, no GPU: CuPy raises its own runtime errors
        return 0


def parse_device(spec: str | Device | None) -> Device:
    """Parse ``cpu``, ``cuda``, ``cuda:k`` or ``auto`` and check the device is usable."""
    if isinstance(spec, Device):
        device = spec
    else:
        text = "cpu" if spec is None else str(spec).strip().lower()
        if text == "auto":
            return Device("cuda", 0) if cuda_device_count() > 0 else Device("cpu")
        match = _DEVICE_RE.match(text)
        if match is None:
            raise DeviceError(f"unknown device {spec!r}: use 'cpu', 'cuda', 'cuda:<index>' or 'auto'")
        device = Device(match.group(1), int(match.group(2) or 0))
    if device.kind == "cuda":
        if cupy is None:
            raise DeviceError(
                f"device {device} needs CuPy, which is not installed: "
                "install the gpu extra (from the clone: pip install -e '.[gpu]') or use device='cpu'"
            )
        count = cuda_device_count()
        if device.index >= count:
            raise DeviceError(
                f"device {device} is not available: CuPy sees {count} CUDA device(s); use device='cpu' or a valid index"
            )
    return device


def namespace(device: Device) -> ModuleType:
    """The array module for ``device``: numpy or cupy."""
    return np if device.kind == "cpu" else cupy


def on_device(device: Device) -> contextlib.AbstractContextManager:
    """Context for layer math: new arrays land on ``device``.

    On CPU it silences NumPy's floating-point warnings instead: a non-finite
    training batch is reported as a NonFiniteError, and eval passes NaN
    through like PyTorch does, so the warnings would only be noise.
    """
    if device.kind == "cpu":
        return np.errstate(invalid="ignore", over="ignore", divide="ignore")
    return cupy.cuda.Device(device.index)


def to_numpy(a: Array) -> np.ndarray:
    """A host copy (or view) of a NumPy or CuPy array."""
    return a.get() if cupy is not None and isinstance(a, cupy.ndarray) else np.asarray(a)


def as_input_array(x: Any, device: Device, what: str) -> Array:
    """Validate an input array's kind, device and dtype; return it without copying."""
    if device.kind == "cpu":
        if cupy is not None and isinstance(x, cupy.ndarray):
            raise DeviceError(f"{what} is a CuPy array but the layer is on cpu: pass a NumPy array (x.get())")
        arr = np.asarray(x)
    else:
        if not isinstance(x, cupy.ndarray):
            raise DeviceError(f"{what} must be a CuPy array for a layer on {device}: move it with cupy.asarray(x)")
        if x.device.id != device.index:
            raise DeviceError(f"{what} is on cuda:{x.device.id} but the layer is on {device}")
        arr = x
    if arr.dtype not in INPUT_DTYPES:
        hint = " (cast it with .astype(numpy.float32))" if arr.dtype.kind in "biu" else ""
        raise DTypeError(f"{what} has dtype {arr.dtype}; normalization needs float16, float32 or float64{hint}")
    return arr


def compute_dtype(*dtypes: np.dtype) -> np.dtype:
    """float64 when any operand (input, gradient, layer) is float64, else float32.

    float16 data therefore always accumulates in float32.
    """
    for d in dtypes:  # every call goes through here: no np.dtype() per operand (dtype == accepts what it accepts)
        if d == _FLOAT64:
            return _FLOAT64
    return _FLOAT32


_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)


class _OnesCache:
    """Read-only ones vectors kept for reuse, least recently used out.

    Their lengths follow the shapes clients send, so the cache is bounded in
    bytes and entries, and a vector over an eighth of the bytes is never kept:
    making it costs one write of n elements, small next to the product of
    n-long rows it feeds.
    """

    def __init__(self, max_bytes: int = 4 << 20, max_entries: int = 256) -> None:
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._vectors: OrderedDict[tuple, Array] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # kernel threads share the cache

    def get(self, xp: ModuleType, n: int, dtype: np.dtype) -> Array:
        if n * dtype.itemsize > self.max_bytes // 8:
            return self._new(xp, n, dtype)
        key = (xp.__name__, n, dtype, 0 if xp is np else cupy.cuda.runtime.getDevice())
        with self._lock:
            if key in self._vectors:
                self._vectors.move_to_end(key)
                return self._vectors[key]
        made = self._new(xp, n, dtype)
        if xp is not np:  # filled on this thread's stream, then read from other streams: finish the fill first
            xp.cuda.get_current_stream().synchronize()
        with self._lock:
            if key not in self._vectors:
                self._vectors[key] = made
                self._bytes += made.nbytes
            while self._bytes > self.max_bytes or len(self._vectors) > self.max_entries:
                self._bytes -= self._vectors.popitem(last=False)[1].nbytes
        return made

    @staticmethod
    def _new(xp: ModuleType, n: int, dtype: np.dtype) -> Array:
        ones = xp.ones(n, dtype=dtype)
        if xp is np:
            ones.flags.writeable = False
        return ones


_ONES = _OnesCache()


def ones(xp: ModuleType, n: int, dtype: np.dtype) -> Array:
    """A read-only ones vector, cached (per size, dtype and device) when it is small."""
    return _ONES.get(xp, n, np.dtype(dtype))


#: Below this many elements, reductions use ``sum`` instead of BLAS.
_BLAS_MIN_SIZE = 1 << 14


def _reduced_axes(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(k for k, (n, o) in enumerate(zip(shape, out_shape, strict=True)) if o == 1 and n != 1)


def _suffix_start(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """First axis of the trailing run of axes that ``out_shape`` reduces to 1."""
    j = len(shape)
    while j > 0 and out_shape[j - 1] == 1:
        j -= 1
    return j


def _prefix_end(out_shape: tuple[int, ...]) -> int:
    """One past the last axis of the leading run of axes reduced to 1."""
    i = 0
    while i < len(out_shape) and out_shape[i] == 1:
        i += 1
    return i


def sum_to(a: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``a`` down to the keepdims ``shape`` (same rank, 1 on reduced axes).

    Trailing reduced axes become one matrix-vector product with ones and
    leading ones a vector-matrix product (BLAS, multi-threaded); whatever is
    left in the middle goes through ``sum``. Returns ``a`` itself when there is
    nothing to reduce: callers never write into the result.
    """
    if a.shape == shape:
        return a
    if a.size < _BLAS_MIN_SIZE:  # a BLAS call costs more than it saves on small arrays
        return a.sum(axis=_reduced_axes(a.shape, shape), keepdims=True)
    xp = array_module(a)
    j = _suffix_start(a.shape, shape)
    if j < a.ndim and math.prod(a.shape[j:]) > 1:
        r = math.prod(a.shape[j:])
        a = (a.reshape(-1, r) @ ones(xp, r, a.dtype)).reshape(a.shape[:j] + (1,) * (a.ndim - j))
    i = min(_prefix_end(shape), j)
    if i > 0:
        lead = math.prod(a.shape[:i])
        a = (ones(xp, lead, a.dtype) @ a.reshape(lead, -1)).reshape((1,) * i + a.shape[i:])
    rest = _reduced_axes(a.shape, shape)
    return a.sum(axis=rest, keepdims=True) if rest else a


def dot_to(a: Array, b: Array, shape: tuple[int, ...]) -> Array:
    """``sum_to(a * b, shape)`` without materializing ``a * b`` where possible.

    ``b`` has ``a``'s shape, or broadcasts against it varying only along the
    trailing axes being reduced (a weight vector): then it is one matvec.
    """
    xp = array_module(a)
    j = _suffix_start(a.shape, shape)
    rows = math.prod(a.shape[:j])
    if j < a.ndim and math.prod(a.shape[j:]) > 1:
        if b.shape == a.shape:
            part = xp.einsum("ij,ij->i", a.reshape(rows, -1), b.reshape(rows, -1))
        elif all(n == 1 for n in b.shape[:j]) and b.shape[j:] == a.shape[j:]:
            part = a.reshape(rows, -1) @ b.reshape(-1)
        else:
            return sum_to(a * b, shape)
        return sum_to(part.reshape(a.shape[:j] + (1,) * (a.ndim - j)), shape)
    i = _prefix_end(shape)
    if i > 0 and b.shape == a.shape:
        lead = math.prod(a.shape[:i])
        part = xp.einsum("ij,ij->j", a.reshape(lead, -1), b.reshape(lead, -1))
        return sum_to(part.reshape((1,) * i + a.shape[i:]), shape)
    return sum_to(a * b, shape)


def array_module(a: Array) -> ModuleType:
    """NumPy or CuPy: the module whose functions apply to ``a``."""
    return np if isinstance(a, np.ndarray) else cupy.get_array_module(a)
