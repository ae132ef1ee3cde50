"""Errors the client raises: one class per gRPC status code a caller may handle."""

from __future__ import annotations

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NormServeError",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "UnknownArgument",
    "error_from_rpc",
]


class NormServeError(Exception):
    """A failed call. ``code`` is the gRPC status code, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None, method: str = "") -> None:
        self.details = details
        self.method = method
        if code is not None:
            self.code = code
        super().__init__(f"{method + ': ' if method else ''}{self.code.name}: {details}")


class InvalidArgument(NormServeError, ValueError):
    """The server refused a request's arguments, or the client did before sending it (then ``method`` is "").

    Also a ValueError, as Python's own argument checks are."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownArgument(InvalidArgument, TypeError):
    """A keyword argument the call does not know (also a TypeError, as Python's own is)."""


class NotFound(NormServeError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(NormServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(NormServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(NormServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(NormServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(NormServeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NormServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(NormServeError):
    """Another rank of a synchronized step failed; the step changed nothing."""

    code = grpc.StatusCode.ABORTED


class DataLoss(NormServeError):
    """The layer's stored state could not be restored by the server; delete it and create it again."""

    code = grpc.StatusCode.DATA_LOSS


#: What a status without details means here (the health service answers NOT_FOUND with none).
_WITHOUT_DETAILS = {
    grpc.StatusCode.NOT_FOUND: "no such name on the server (for health: the service is not one it reports on)",
    grpc.StatusCode.UNIMPLEMENTED: "the server does not offer this method (an older or another server?)",
}
_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        Aborted,
        DataLoss,
    )
}


def error_from_rpc(error: grpc.RpcError, method: str = "") -> NormServeError:
    """The NormServeError subclass for a failed gRPC call."""
    code = error.code()
    cls = _BY_CODE.get(code, NormServeError)
    # gRPC's own connection errors end in the status of a sub-step, ": OK", which reads as a contradiction.
    details = (error.details() or "").removesuffix(": OK")
    return cls(details or _WITHOUT_DETAILS.get(code, ""), code=code, method=method)
