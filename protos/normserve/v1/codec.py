"""NumPy arrays <-> ``normserve.v1.Tensor`` messages, shared by the server and the client.

Decoding checks everything a peer could get wrong (dtype, shape, byte length,
size limits) before touching the bytes, and returns a read-only view of the
buffer the elements arrived in: no copy. Tensors whose elements travel
outside the message (see :mod:`normserve.v1.wire`) are decoded from that
buffer, and sent as a header plus an array.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from normserve.v1 import normalization_pb2 as pb

__all__ = [
    "MAX_RANK",
    "WIRE_DTYPES",
    "TensorError",
    "TensorTooLarge",
    "as_dtype",
    "check",
    "decode",
    "dtype_enum",
    "encode",
    "outgoing",
]

#: The wire's element types, in the order errors name them.
_WIRE_ENUMS = (pb.FLOAT32, pb.FLOAT64, pb.FLOAT16, pb.BFLOAT16)
_NAMES = ", ".join(pb.DType.Name(e) for e in _WIRE_ENUMS)
_INT64_MAX = 2**63 - 1
#: More dimensions than any normalization input has (PyTorch's own limit is 64).
MAX_RANK = 32


@functools.cache
def _wire_dtypes() -> dict[int, np.dtype]:
    """Element types of the wire, as little-endian NumPy dtypes (``WIRE_DTYPES``).

    ml_dtypes (bfloat16) takes seconds to import on a busy machine, so the first tensor imports it, not
    ``import normserve.client``: a command that sends no tensor (``normserve health``) never waits for it.
    """
    import ml_dtypes

    dtypes = ("<f4", "<f8", "<f2", ml_dtypes.bfloat16)  # ml_dtypes' bfloat16 is little-endian on every platform
    return {enum: np.dtype(dtype) for enum, dtype in zip(_WIRE_ENUMS, dtypes, strict=True)}


@functools.cache
def _enum_by_dtype() -> dict[np.dtype, int]:
    return {dtype.newbyteorder("="): enum for enum, dtype in _wire_dtypes().items()}


#: Element types of the wire, as little-endian NumPy dtypes: ``_wire_dtypes()``, bound at first use by __getattr__.
WIRE_DTYPES: dict[int, np.dtype]


def __getattr__(name: str) -> Any:
    if name == "WIRE_DTYPES":  # computed at first use (see _wire_dtypes), then an ordinary module global
        globals()[name] = _wire_dtypes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_dtype(dtype: Any) -> np.dtype:
    """``np.dtype(dtype)``, knowing ``"bfloat16"`` (ml_dtypes') too."""
    _wire_dtypes()  # registers bfloat16 with NumPy
    return np.dtype(dtype)


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array."""


class TensorTooLarge(TensorError):
    """A valid Tensor over a configured size limit."""


def dtype_enum(dtype: Any) -> int:
    """The wire enum for a NumPy dtype (or dtype name such as ``"bfloat16"``)."""
    try:
        key = as_dtype(dtype).newbyteorder("=")
    except TypeError:
        key = None
    enums = _enum_by_dtype()
    if key not in enums:
        raise TensorError(f"dtype {dtype!r} cannot go on the wire; use one of float32, float64, float16, bfloat16")
    return enums[key]


def outgoing(array: Any, dtype: int | None = None) -> tuple[pb.Tensor, np.ndarray]:
    """(A Tensor header with dtype and shape, the elements as a C-contiguous array in that dtype).

    ``dtype`` is the wire enum to cast to (None or DTYPE_UNSPECIFIED: the
    array's own); no copy when the array already is contiguous in it.
    """
    array = np.asarray(array)
    enum = dtype_enum(array.dtype) if dtype is None or dtype == pb.DTYPE_UNSPECIFIED else dtype
    dtypes = _wire_dtypes()
    if enum not in dtypes:
        raise TensorError(f"unknown wire dtype {enum}; use one of {_NAMES}")
    data = np.ascontiguousarray(array, dtype=dtypes[enum])
    return pb.Tensor(dtype=enum, shape=data.shape), data


def encode(array: Any, dtype: int | None = None) -> pb.Tensor:
    """A Tensor holding ``array`` in its message (for small tensors; large ones go through ``outgoing``)."""
    tensor, data = outgoing(array, dtype)
    tensor.data = data.tobytes()
    return tensor


def check(
    tensor: pb.Tensor,
    what: str = "tensor",
    *,
    max_elements: int | None = None,
    max_bytes: int | None = None,
) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, byte length) a Tensor header describes, checked against the limits."""
    dtype = _wire_dtypes().get(tensor.dtype)
    if dtype is None:
        if tensor.dtype == pb.DTYPE_UNSPECIFIED:
            raise TensorError(f"{what}.dtype is not set; set it to one of {_NAMES}")
        raise TensorError(f"{what}.dtype {tensor.dtype} is not a known DType; use one of {_NAMES}")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise TensorError(f"{what} has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    if any(d < 0 for d in shape):
        raise TensorError(f"{what}.shape {list(shape)} has a negative dimension; every dimension must be >= 0")
    # Dimensions count even beside a 0: an array of shape (0, 2**62) is not one NumPy (or a kernel) can make.
    span = math.prod(max(d, 1) for d in shape)
    if span * dtype.itemsize > _INT64_MAX:
        raise TensorError(f"{what}.shape {list(shape)} has more elements than an int64 can count")
    elements = math.prod(shape)
    if max_elements is not None and span > max_elements:
        raise TensorTooLarge(
            f"{what} has shape {list(shape)[:8]}: {span} elements counting every dimension, over the server's "
            f"limit of {max_elements}; send smaller batches"
        )
    expected = elements * dtype.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise TensorTooLarge(f"{what} has {expected} bytes, over the server's limit of {max_bytes}; send smaller ones")
    return dtype, shape, expected


def decode(
    tensor: pb.Tensor,
    what: str = "tensor",
    *,
    data: Any = None,
    where: str = "data",
    max_elements: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """The array a Tensor describes, as a read-only view of its elements.

    The elements are ``data`` (any buffer, e.g. a memoryview of the received
    bytes or of shared memory, named ``where`` in errors) or else the
    message's own ``data`` field. Raises :class:`TensorError` for a malformed
    tensor and :class:`TensorTooLarge` when it exceeds ``max_elements`` or
    ``max_bytes``.
    """
    dtype, shape, expected = check(tensor, what, max_elements=max_elements, max_bytes=max_bytes)
    if data is None:
        data = tensor.data  # read the field once: each read of a bytes field copies it
    nbytes = memoryview(data).nbytes
    if nbytes != expected:
        raise TensorError(
            f"{what}.{where} has {nbytes} bytes but shape {list(shape)} of {pb.DType.Name(tensor.dtype)} "
            f"needs {expected} ({math.prod(shape)} elements x {dtype.itemsize} bytes, C order, little-endian)"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    array.flags.writeable = False  # a view of a request, or of memory a client shares: never written
    return array
