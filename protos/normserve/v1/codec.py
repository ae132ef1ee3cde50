"""NumPy arrays <-> ``normserve.v1.Tensor`` messages, shared by the server and the client.

Decoding checks everything a peer could get wrong (dtype, shape, byte length,
size limits) before touching the bytes, and returns a read-only view of the
buffer the elements arrived in: no copy. Tensors whose elements travel
outside the message (see :mod:`normserve.v1.wire`) are decoded from that
buffer, and sent as a header plus an array.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from normserve.v1 import normalization_pb2 as pb

__all__ = [
    "MAX_RANK",
    "WIRE_DTYPES",
    "TensorError",
    "TensorTooLarge",
    "check",
    "decode",
    "dtype_enum",
    "encode",
    "outgoing",
]

#: Element types of the wire, as little-endian NumPy dtypes.
WIRE_DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.BFLOAT16: np.dtype(ml_dtypes.bfloat16),  # ml_dtypes' bfloat16 is little-endian on every platform we run
}
_ENUM_BY_DTYPE = {dtype.newbyteorder("="): enum for enum, dtype in WIRE_DTYPES.items()}
_NAMES = ", ".join(pb.DType.Name(e) for e in WIRE_DTYPES)
_INT64_MAX = 2**63 - 1
#: More dimensions than any normalization input has (PyTorch's own limit is 64).
MAX_RANK = 32


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array."""


class TensorTooLarge(TensorError):
    """A valid Tensor over a configured size limit."""


def dtype_enum(dtype: Any) -> int:
    """The wire enum for a NumPy dtype (or dtype name such as ``"bfloat16"``)."""
    try:
        key = np.dtype(dtype).newbyteorder("=")
    except TypeError:
        key = None
    if key not in _ENUM_BY_DTYPE:
        raise TensorError(f"dtype {dtype!r} cannot go on the wire; use one of float32, float64, float16, bfloat16")
    return _ENUM_BY_DTYPE[key]


def outgoing(array: Any, dtype: int | None = None) -> tuple[pb.Tensor, np.ndarray]:
    """(A Tensor header with dtype and shape, the elements as a C-contiguous array in that dtype).

    ``dtype`` is the wire enum to cast to (None or DTYPE_UNSPECIFIED: the
    array's own); no copy when the array already is contiguous in it.
    """
    array = np.asarray(array)
    enum = dtype_enum(array.dtype) if dtype is None or dtype == pb.DTYPE_UNSPECIFIED else dtype
    if enum not in WIRE_DTYPES:
        raise TensorError(f"unknown wire dtype {enum}; use one of {_NAMES}")
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[enum])
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
    dtype = WIRE_DTYPES.get(tensor.dtype)
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
