"""normkernels: normalization layers with PyTorch's semantics on NumPy and CuPy.

>>> import numpy as np, normkernels
>>> bn = normkernels.BatchNorm(3)
>>> y = bn.forward(np.random.default_rng(0).normal(size=(8, 3, 5)).astype(np.float32), training=True)
>>> int(bn.num_batches_tracked)
1
"""

from normkernels.backend import Device, cuda_device_count, parse_device
from normkernels.base import MAX_BATCHES_TRACKED, state_budget
from normkernels.core import Moments, Plan, backward, forward_eval, forward_train
from normkernels.errors import (
    ConfigError,
    DeviceError,
    DTypeError,
    NonFiniteError,
    NormError,
    ShapeError,
    StateDictError,
    StateTooLarge,
)
from normkernels.interfaces import MathBackend, NormLayer, SyncedNorm
from normkernels.layers import (
    KINDS,
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    LayerNorm2d,
    RMSNorm,
    config_names,
    config_parameters,
    make_layer,
    synced,
)
from normkernels.monitor import BatchReport

__all__ = [
    "KINDS",
    "MAX_BATCHES_TRACKED",
    "BatchNorm",
    "BatchReport",
    "ConfigError",
    "DTypeError",
    "Device",
    "DeviceError",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "LayerNorm2d",
    "MathBackend",
    "Moments",
    "NonFiniteError",
    "NormError",
    "NormLayer",
    "Plan",
    "RMSNorm",
    "ShapeError",
    "StateDictError",
    "StateTooLarge",
    "SyncedNorm",
    "backward",
    "config_names",
    "config_parameters",
    "cuda_device_count",
    "forward_eval",
    "forward_train",
    "make_layer",
    "parse_device",
    "state_budget",
    "synced",
]
