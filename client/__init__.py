"""normserve.client: Python clients for the normserve gRPC service.

>>> from normserve.client import NormClient
>>> with NormClient("localhost:50051") as nc:                          # doctest: +SKIP
...     bn = nc.create_layer("encoder.bn1", "batch_norm", num_features=64)
...     y = bn.train(x)

:class:`NormClient` blocks; :class:`AsyncNormClient` has the same methods as
coroutines. Inputs may be NumPy arrays, CuPy arrays or torch tensors; results
are always NumPy arrays in the input's dtype. Failures raise
:class:`NormServeError` subclasses carrying the gRPC status code.
:class:`SyncGroup` makes Train and Gradient calls of several workers one
synchronized batch norm step. PyTorch modules backed by the service are in
:mod:`normserve.client.torch` (imported separately: torch is optional).
"""

from normserve.client.aio import AsyncNormClient, AsyncRemoteLayer
from normserve.client.blocking import NormClient, RemoteLayer
from normserve.client.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    MalformedAnswer,
    NormServeError,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from normserve.client.protocol import RetryPolicy, SyncGroup

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncNormClient",
    "AsyncRemoteLayer",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "MalformedAnswer",
    "NormClient",
    "NormServeError",
    "NotFound",
    "RemoteLayer",
    "ResourceExhausted",
    "RetryPolicy",
    "SyncGroup",
    "Unauthenticated",
    "Unavailable",
]
