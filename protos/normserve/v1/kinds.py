"""Layer kinds on the wire: the ``Kind`` enum and ``LayerConfig`` fields, read off the kinds' constructors.

A kind is declared once, as a class in :mod:`normkernels.layers` (its config is
its constructor's signature) plus a value of the proto's ``Kind`` enum. The
server and the clients derive from here which ``LayerConfig`` field carries
which constructor argument, so neither keeps a table per kind.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from normserve.v1 import codec
from normserve.v1 import normalization_pb2 as pb

__all__ = [
    "COMMON_ARGUMENTS",
    "argument_fields",
    "config_fields",
    "kind_enum",
    "kind_names",
    "layer_config",
    "required_fields",
]

#: Constructor arguments kept in a LayerConfig field of another name (the kinds share the message's fields).
_FIELD_OF_ARGUMENT = {"num_channels": "num_features", "elementwise_affine": "affine"}
#: Arguments every kind takes, in fields of their own (LayerConfig.device, LayerConfig.param_dtype).
COMMON_ARGUMENTS = ("device", "dtype")


def kind_names() -> list[str]:
    """The kinds the wire can name, e.g. ``["batch_norm", ...]``."""
    return [name.lower() for name in pb.Kind.keys() if name != "KIND_UNSPECIFIED"]  # noqa: SIM118


def kind_enum(kind: str) -> int:
    """``"batch_norm"`` -> ``pb.BATCH_NORM``; ValueError for a name the wire does not know."""
    return pb.Kind.Value(kind.upper())


@functools.cache
def config_fields(kind: str) -> dict[str, str]:
    """LayerConfig field -> constructor argument, for the kind's own arguments."""
    import normkernels  # here, not at the top: the kernels (numba) load only when a config is built or read

    names = normkernels.config_names(normkernels.KINDS[kind])
    return {_FIELD_OF_ARGUMENT.get(arg, arg): arg for arg in names if arg not in COMMON_ARGUMENTS}


@functools.cache
def required_fields(kind: str) -> tuple[str, ...]:
    """The LayerConfig fields a config of ``kind`` must set (arguments without a default)."""
    import normkernels

    parameters = normkernels.config_parameters(normkernels.KINDS[kind])
    return tuple(f for f, arg in config_fields(kind).items() if parameters[arg].default is inspect.Parameter.empty)


@functools.cache
def argument_fields() -> dict[str, str]:
    """Constructor argument -> LayerConfig field, over every kind (a client's keyword arguments)."""
    return {arg: field for kind in kind_names() for field, arg in config_fields(kind).items()}


def layer_config(kind: str, **arguments: Any) -> pb.LayerConfig:
    """A LayerConfig from PyTorch-style arguments: ``layer_config("group_norm", num_groups=4, num_channels=32)``.

    The one encoder of constructor arguments (the clients and the server's --layers-file use it): ValueError
    for an unknown kind, TypeError for an argument no kind takes.
    """
    try:
        config = pb.LayerConfig(kind=kind_enum(kind))
    except ValueError:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {sorted(kind_names())}") from None
    fields = {**argument_fields(), "device": "device"}
    for arg, value in arguments.items():
        if arg == "dtype":
            config.param_dtype = codec.dtype_enum(value)
        elif arg not in fields:
            raise TypeError(f"unexpected argument {arg!r} for a layer config; known: {sorted(fields)} + dtype")
        elif arg == "momentum" and value is None:
            config.cumulative_average = True
        elif value is None:  # e.g. RMSNorm's eps=None: the server's default
            continue
        elif arg == "normalized_shape":
            config.normalized_shape.extend([value] if isinstance(value, int) else value)
        else:
            setattr(config, fields[arg], value)
    return config
