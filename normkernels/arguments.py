"""Checks of constructor arguments: each returns the value in its canonical type or raises ConfigError."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from normkernels.backend import PARAM_DTYPES
from normkernels.errors import ConfigError

#: More trailing dimensions than any input of ours has (the wire allows 32).
MAX_NORMALIZED_DIMS = 32


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def eps(value: Any, name: str = "eps") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0 < float(value) < math.inf):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def momentum(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (0.0 <= float(value) <= 1.0):
        raise ConfigError(f"momentum must be in [0, 1] or None (cumulative average), got {value!r}")
    return float(value)


def param_dtype(value: Any) -> np.dtype:
    try:
        dtype = np.dtype(value)
    except TypeError:
        dtype = None
    if dtype not in PARAM_DTYPES:
        raise ConfigError(
            f"dtype must be float32 or float64 (the dtype of parameters and running stats), got {value!r}"
        )
    return dtype


def normalized_shape(value: Any) -> tuple[int, ...]:
    dims = (value,) if isinstance(value, numbers.Integral) else value
    try:
        dims = tuple(dims)
    except TypeError:
        raise ConfigError(f"normalized_shape must be an int or a sequence of ints, got {value!r}") from None
    if not dims:
        raise ConfigError("normalized_shape must have at least one dimension")
    if len(dims) > MAX_NORMALIZED_DIMS:
        raise ConfigError(f"normalized_shape may have at most {MAX_NORMALIZED_DIMS} dimensions, got {len(dims)}")
    return tuple(positive_int(d, "every normalized_shape entry") for d in dims)
