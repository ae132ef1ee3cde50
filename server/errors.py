"""Service-level errors, the gRPC status code each one answers with, and the standard ``google.rpc`` details
sent beside the message (:func:`status_details`).

Every refusal carries an ``ErrorInfo`` (domain ``normserve``) whose ``reason``
names the error for programs: the error's class name in UPPER_SNAKE_CASE
(``LayerNotFound`` -> ``LAYER_NOT_FOUND``), so clients in any language can
branch on it rather than on the message's words. A refusal that knows which
request field was wrong adds a ``BadRequest`` with that field's violation.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from normkernels import NormError
from normserve.v1.codec import TensorError, TensorTooLarge
from normserve.v1.wire import WireError

__all__ = [
    "AnswerTooLarge",
    "ForwardGone",
    "ForwardTooLarge",
    "InvalidRequest",
    "LayerExists",
    "LayerNotFound",
    "LayerTooLarge",
    "LayerUnrestorable",
    "RegionExists",
    "RegionNotFound",
    "ServiceError",
    "SharedMemoryOff",
    "ShuttingDown",
    "StaleVersion",
    "StateDirFull",
    "SyncAborted",
    "SyncTimeout",
    "TooManyLayers",
    "VersionDamaged",
    "VersionNotKept",
    "WaitTimeout",
    "reason_for",
    "status_details",
    "status_for",
]

#: ErrorInfo.domain of every error this server sends.
DOMAIN = "normserve"


class ServiceError(Exception):
    """An error with a gRPC status code; its message goes to the client as is. ``field``: the request field
    that was wrong, when one was (a BadRequest field violation)."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    field: str = ""


class InvalidRequest(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class LayerNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"no layer named {name!r}; create it with CreateLayer (ListLayers shows what exists)")


class VersionNotKept(ServiceError):
    """A version of a layer the server does not keep (any more, or yet)."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str, version: int, oldest: int, current: int) -> None:
        super().__init__(
            f"layer {name!r} has no version {version}: the server keeps versions {oldest} to {current} "
            "(the last --keep-versions; GetLayer's oldest_version and version)"
        )


class VersionDamaged(ServiceError):
    """A kept version whose stored rows cannot be read back (or no longer fit the layer); the current state is
    untouched."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, name: str, version: int, why: str) -> None:
        super().__init__(
            f"layer {name!r}'s kept version {version} cannot be read from the state directory ({why}); the "
            "layer's current state is unchanged. Choose another kept version, or restore the state directory "
            "from a backup"
        )


class LayerExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class LayerUnrestorable(ServiceError):
    """The layer's stored state could not be restored at startup; it serves nothing until replaced."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, name: str, why: str) -> None:
        super().__init__(
            f"layer {name!r} could not be restored from the state directory ({why}); its other calls answer this "
            "too. Delete it (DeleteLayer) and create it again, or restore the state directory from a backup"
        )


class AnswerTooLarge(ServiceError):
    """An answer that could not be sent in one message (checked before any work)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class LayerTooLarge(ServiceError):
    """A layer's state (or an answer) over a byte budget."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StaleVersion(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ShuttingDown(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class StateDirFull(ServiceError):
    """SQLite could not write: the state directory's filesystem has no room (or quota) left."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__(
            f"the state directory {directory} is full: free space there (or move --state-dir); nothing was changed"
        )


class TooManyLayers(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ForwardGone(ServiceError):
    """A Gradient names a kept forward the server no longer holds."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ForwardTooLarge(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class SharedMemoryOff(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class RegionExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class TooManyRegions(ServiceError):
    """A registration over the shared-memory budgets (regions, or the descriptors kept for connections)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RegionNotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, name: str) -> None:
        super().__init__(f"no shared-memory region named {name!r} (ListSharedMemory shows what is registered)")


class SyncAborted(ServiceError):
    """Another rank of a synchronized step failed or gave up; the step changed nothing."""

    code = grpc.StatusCode.ABORTED


class SyncTimeout(ServiceError):
    """Not every rank of a synchronized step arrived in time; the step changed nothing."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class WaitTimeout(ServiceError):
    """A call waited longer than its deadline (or the server's default) before it could start."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def reason_for(exc: BaseException | type[BaseException]) -> str:
    """The ErrorInfo reason of an error: its class name in UPPER_SNAKE_CASE."""
    name = (exc if isinstance(exc, type) else type(exc)).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def status_details(
    code: grpc.StatusCode, message: str, reason: str, fields: Sequence[tuple[str, str]] = ()
) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries a refusal's google.rpc.Status: ``message`` (the status message too),
    an ErrorInfo with ``reason``, and a BadRequest when ``fields`` names (field, what is wrong) pairs."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    if fields:
        violations = [error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in fields]
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=violations))
    return rpc_status.to_status(status).trailing_metadata


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for an error a client caused, or None for a server bug."""
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, TensorTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, (TensorError, NormError, WireError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return None
