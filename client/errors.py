"""Errors the client raises: one class per gRPC status code a caller may handle, with the server's
standard ``google.rpc`` details (ErrorInfo reason, BadRequest field violations) when it sent them."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "MalformedAnswer",
    "NormServeError",
    "NotFound",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "UnknownArgument",
    "error_from_rpc",
    "error_from_status",
]


class NormServeError(Exception):
    """A failed call. ``code`` is the gRPC status code, ``details`` the server's message, ``reason`` the
    ErrorInfo reason a program can branch on (``"LAYER_NOT_FOUND"``; "" when the server sent none), and
    ``field_violations`` the BadRequest's (field, description) pairs."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    #: Statistics mode: the module's training steps whose updates this error is about (see
    #: :mod:`normserve.client.statistics_pipeline`); empty for any other failure.
    steps: tuple[int, ...] = ()
    #: Statistics mode: the layer those steps are of.
    layer: str = ""

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        method: str = "",
        reason: str = "",
        field_violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.details = details
        self.method = method
        self.reason = reason
        self.field_violations = field_violations
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


class MalformedAnswer(NormServeError):
    """The server's answer does not fit the request: it does not decode, names an unknown value, or
    describes tensors other than the ones asked for (another shape, dtype or size). A broken or hostile
    server, or one of a version this client does not know; nothing of the answer is returned. Checked
    before the answer's tensors are allocated, so a lying answer costs no more memory than a true one."""

    code = grpc.StatusCode.INTERNAL


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


#: What gRPC reports (as INTERNAL) when the client's own parser refused the answer's bytes.
_UNPARSED_ANSWER = "Exception deserializing response!"


def _rich_details(error: grpc.RpcError) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The ErrorInfo reason and BadRequest field violations of a failed call's google.rpc.Status, if any.
    Whatever the server sent there, a failure to read it leaves them empty, never raises."""
    reason, violations = "", []
    with contextlib.suppress(Exception):
        status: Any = rpc_status.from_call(error)  # None without details; ValueError if they contradict the call
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason = reason or info.reason[:256]
                elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                    bad = error_details_pb2.BadRequest()
                    detail.Unpack(bad)
                    violations += [(v.field[:256], v.description[:4096]) for v in bad.field_violations[:64]]
    return reason, tuple(violations)


def error_from_rpc(error: grpc.RpcError, method: str = "") -> NormServeError:
    """The NormServeError subclass for a failed gRPC call."""
    code = error.code()
    # gRPC's own connection errors end in the status of a sub-step, ": OK", which reads as a contradiction.
    details = (error.details() or "").removesuffix(": OK")
    if code == grpc.StatusCode.INTERNAL and details == _UNPARSED_ANSWER:  # the answer, not the server, failed
        return MalformedAnswer("the server's answer is not a valid message of its type", method=method)
    reason, violations = _rich_details(error)
    return error_from_status(code, details, method, reason, violations)


def error_from_status(
    code: grpc.StatusCode,
    details: str,
    method: str = "",
    reason: str = "",
    field_violations: tuple[tuple[str, str], ...] = (),
) -> NormServeError:
    """The NormServeError subclass for a status ``code`` with the server's ``details`` (a failed call's, or
    one update's outcome within a PushStatistics answer)."""
    cls = _BY_CODE.get(code, NormServeError)
    return cls(
        details or _WITHOUT_DETAILS.get(code, ""),
        code=code,
        method=method,
        reason=reason,
        field_violations=field_violations,
    )
