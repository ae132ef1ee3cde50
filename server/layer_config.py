"""``LayerConfig`` messages <-> normkernels layers.

One table says which proto field feeds which constructor argument for each
kind; building a layer and describing one both read it, so the wire and the
kernels cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

import normkernels
from normserve.server.errors import InvalidRequest
from normserve.v1 import normalization_pb2 as pb

__all__ = ["NAME_PATTERN", "build_layer", "check_name", "describe_config", "kind_name"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,256}")

_TRACKED = {
    "num_features": "num_features",
    "eps": "eps",
    "momentum": "momentum",
    "affine": "affine",
    "track_running_stats": "track_running_stats",
    "biased_running_var": "biased_running_var",
}
#: proto field -> constructor argument, per kind. ``cumulative_average`` is
#: the proto's spelling of PyTorch's ``momentum=None``.
_FIELDS: dict[str, dict[str, str]] = {
    "batch_norm": _TRACKED,
    "instance_norm": _TRACKED,
    "group_norm": {"num_features": "num_channels", "num_groups": "num_groups", "eps": "eps", "affine": "affine"},
    "layer_norm": {
        "normalized_shape": "normalized_shape",
        "eps": "eps",
        "affine": "elementwise_affine",
        "bias": "bias",
    },
    "rms_norm": {"normalized_shape": "normalized_shape", "eps": "eps", "affine": "elementwise_affine"},
}
_PARAM_DTYPES = {pb.DTYPE_UNSPECIFIED: "float32", pb.FLOAT32: "float32", pb.FLOAT64: "float64"}
_ALWAYS = {"kind", "device", "param_dtype"}


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid layer name, else raise INVALID_ARGUMENT."""
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 80 else name[:80] + "..."
        raise InvalidRequest(
            f"{what} {shown!r} (length {len(name)}) is not a valid layer name: use 1 to 256 characters "
            "from A-Z a-z 0-9 _ . : / -"
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
    fields = _FIELDS[kind]
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
    for field, arg in fields.items():  # required sizes: say which field is missing rather than "got 0"
        if field in ("num_features", "num_groups", "normalized_shape") and arg not in args:
            raise InvalidRequest(f"config.{field} is required for {kind} and must be > 0")
    if config.param_dtype not in _PARAM_DTYPES:
        raise InvalidRequest("config.param_dtype must be FLOAT32 (the default) or FLOAT64")
    args["dtype"] = _PARAM_DTYPES[config.param_dtype]
    args["device"] = config.device or default_device
    return kind, args


def build_layer(config: pb.LayerConfig, default_device: str, max_state_bytes: int | None = None) -> Any:
    """A fresh normkernels layer for ``config``; INVALID_ARGUMENT when the config is bad, StateTooLarge
    (before any allocation) when its state would take more than ``max_state_bytes``."""
    kind, args = _constructor_args(config, default_device)
    with normkernels.state_budget(max_state_bytes):
        return normkernels.make_layer(kind, **args)


def describe_config(layer: Any) -> pb.LayerConfig:
    """The fully resolved LayerConfig of a layer (every default filled in)."""
    values = layer.config
    config = pb.LayerConfig(
        kind=pb.Kind.Value(layer.kind.upper()),
        device=values["device"],
        param_dtype=pb.FLOAT64 if np.dtype(values["dtype"]) == np.float64 else pb.FLOAT32,
    )
    for field, arg in _FIELDS[layer.kind].items():
        value = values[arg]
        if field == "momentum" and value is None:
            config.cumulative_average = True
        elif field == "normalized_shape":
            config.normalized_shape.extend(value)
        elif value is not None:  # RMSNorm's eps=None stays unset: "the compute dtype's epsilon"
            setattr(config, field, value)
    return config
