"""NumPy arrays <-> ``normserve.v1.Tensor`` messages, shared by the server and the client.

Decoding checks everything a peer could get wrong (dtype, shape, byte length,
size limits) before touching the bytes, and returns a read-only view of the
message's buffer: no copy.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from normserve.v1 import normalization_pb2 as pb

__all__ = ["MAX_RANK", "WIRE_DTYPES", "TensorError", "TensorTooLarge", "decode", "dtype_enum", "encode"]

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


def encode(array: Any, dtype: int | None = None) -> pb.Tensor:
    """A Tensor holding ``array`` (cast to the wire ``dtype`` enum when given)."""
    array = np.asarray(array)
    enum = dtype_enum(array.dtype) if dtype is None or dtype == pb.DTYPE_UNSPECIFIED else dtype
    if enum not in WIRE_DTYPES:
        raise TensorError(f"unknown wire dtype {enum}; use one of {_NAMES}")
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPES[enum])
    return pb.Tensor(dtype=enum, shape=data.shape, data=data.tobytes())


def decode(
    tensor: pb.Tensor,
    what: str = "tensor",
    *,
    max_elements: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """The array a Tensor describes, as a read-only view of its bytes.

    Raises :class:`TensorError` for a malformed tensor and
    :class:`TensorTooLarge` when it exceeds ``max_elements`` or ``max_bytes``.
    """
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
    elements = math.prod(shape)
    if elements > _INT64_MAX:
        raise TensorError(f"{what}.shape {list(shape)} has more elements than an int64 can count")
    if max_elements is not None and elements > max_elements:
        raise TensorTooLarge(
            f"{what} has {elements} elements, over the server's limit of {max_elements}; send smaller batches"
        )
    expected = elements * dtype.itemsize
    data = tensor.data  # read the field once: each read of a bytes field may copy it
    if max_bytes is not None and expected > max_bytes:
        raise TensorTooLarge(f"{what} has {expected} bytes, over the server's limit of {max_bytes}; send smaller ones")
    if len(data) != expected:
        raise TensorError(
            f"{what}.data has {len(data)} bytes but shape {list(shape)} of {pb.DType.Name(tensor.dtype)} "
            f"needs {expected} ({elements} elements x {dtype.itemsize} bytes, C order, little-endian)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
