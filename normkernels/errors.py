"""Errors raised by normkernels.

Every error a caller can cause is a ``NormError`` (a ``ValueError``), so one
``except ValueError`` catches bad input, and the service maps the whole family
to INVALID_ARGUMENT. Subclasses say which part of the request was wrong.
"""

from __future__ import annotations


class NormError(ValueError):
    """Base class: the input, config or state given to a layer is unusable."""


class ConfigError(NormError):
    """A layer constructor argument is invalid (eps <= 0, groups not dividing channels, ...)."""


class ShapeError(NormError):
    """An array's rank or dimensions do not fit the layer."""


class DTypeError(NormError):
    """An array's dtype cannot be normalized (integers, bools, complex, ...)."""


class NonFiniteError(NormError):
    """A training batch holds NaN or Inf; the layer's state was left untouched."""


class StateDictError(NormError):
    """A state dict does not fit the layer; nothing was loaded."""


class DeviceError(NormError):
    """A device is unknown or unavailable, or an array lives on the wrong device."""


class StateTooLarge(NormError):
    """A layer's state would take more bytes than the :func:`~normkernels.layers.state_budget` allows."""

    def __init__(self, needed: int, allowed: int, what: str) -> None:
        self.needed, self.allowed = needed, allowed
        super().__init__(
            f"{what} needs {needed} bytes of state (parameters and running statistics), over the {allowed} allowed"
        )
