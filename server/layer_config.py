"""``LayerConfig`` messages <-> normkernels layers.

Which proto field feeds which constructor argument is read off each kind's
constructor (:mod:`normserve.v1.kinds`); building a layer and describing one
both use it, so the wire and the kernels cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

import normkernels
from normserve.server.errors import InvalidRequest
from normserve.v1 import kinds
from normserve.v1 import normalization_pb2 as pb

__all__ = ["NAME_PATTERN", "build_layer", "check_name", "describe_config", "kind_name"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,256}")

_PARAM_DTYPES = {pb.DTYPE_UNSPECIFIED: "float32", pb.FLOAT32: "float32", pb.FLOAT64: "float64"}
_ALWAYS = {"kind", "device", "param_dtype"}


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid layer name, else raise INVALID_ARGUMENT."""
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidRequest(
            f"{what} {shown!r} (length {len(name)}) is not a valid layer name: use 1 to 256 characters "
            "from A-Z a-z 0-9 _ . : / -",
            field=what,
        )
    return name


def kind_name(kind: int) -> str:
    """``pb.BATCH_NORM`` -> ``"batch_norm"``; INVALID_ARGUMENT for unset or unknown kinds."""
    if kind == pb.KIND_UNSPECIFIED or kind not in pb.Kind.values():
        choices = ", ".join(k for k in pb.Kind.keys() if k != "KIND_UNSPECIFIED")  # noqa: SIM118
        raise InvalidRequest(f"config.kind {kind} is not set or unknown; choose one of {choices}")
    return pb.Kind.Name(kind).lower()


def _constructor_args(config: pb.LayerConfig, default_device: str) -> tuple[str, dict[str, Any]]:
    kind = kind_name(config.kind)
    fields = kinds.config_fields(kind)
    given = {field.name: value for field, value in config.ListFields() if field.name not in _ALWAYS}
    if "cumulative_average" in given:
        if "momentum" in given:
            raise InvalidRequest("config sets both momentum and cumulative_average (which means no momentum); pick one")
        if "momentum" not in fields:
            raise InvalidRequest(f"config.cumulative_average does not apply to {kind}")
        del given["cumulative_average"]
        given["momentum"] = None
    foreign = sorted(set(given) - set(fields))
    if foreign:
        raise InvalidRequest(
            f"config field(s) {foreign} do not apply to {kind}; it takes {sorted(fields)} (plus device, param_dtype)"
        )
    args = {fields[field]: list(value) if field == "normalized_shape" else value for field, value in given.items()}
    for field in kinds.required_fields(kind):  # say which field is missing rather than "got 0"
        if fields[field] not in args:
            raise InvalidRequest(f"config.{field} is required for {kind} and must be > 0")
    if config.param_dtype not in _PARAM_DTYPES:
        raise InvalidRequest("config.param_dtype must be FLOAT32 (the default) or FLOAT64")
    args["dtype"] = _PARAM_DTYPES[config.param_dtype]
    args["device"] = config.device or default_device
    return kind, args


def build_layer(
    config: pb.LayerConfig, default_device: str, max_state_bytes: int | None = None
) -> normkernels.NormLayer:
    """A fresh normkernels layer for ``config``; INVALID_ARGUMENT when the config is bad, StateTooLarge
    (before any allocation) when its state would take more than ``max_state_bytes``."""
    kind, args = _constructor_args(config, default_device)
    with normkernels.state_budget(max_state_bytes):
        return normkernels.make_layer(kind, **args)


def describe_config(layer: normkernels.NormLayer) -> pb.LayerConfig:
    """The fully resolved LayerConfig of a layer (every default filled in)."""
    values = layer.config
    config = pb.LayerConfig(
        kind=kinds.kind_enum(layer.kind),
        device=values["device"],
        param_dtype=pb.FLOAT64 if np.dtype(values["dtype"]) == np.float64 else pb.FLOAT32,
    )
    for field, arg in kinds.config_fields(layer.kind).items():
        value = values[arg]
        if field == "momentum" and value is None:
            config.cumulative_average = True
        elif field == "normalized_shape":
            config.normalized_shape.extend(value)
        elif value is not None:  # RMSNorm's eps=None stays unset: "the compute dtype's epsilon"
            setattr(config, field, value)
    return config
