"""Blocking client: :class:`NormClient` and the :class:`RemoteLayer` handles it returns.

Their methods are the operations of :mod:`normserve.client.operations`, carried out by :func:`_run`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from normserve.client import operations, protocol
from normserve.client.statistics_pipeline import StatisticsPipeline

__all__ = ["NormClient", "RemoteLayer"]

_T = TypeVar("_T")
_PIPELINE_MADE = threading.Lock()


def _run(plan: operations.Plan[_T]) -> _T:
    """Carry out a plan: call each step, and send its result (or throw its exception) back in."""
    try:
        step = next(plan)
        while True:
            try:
                result = step()
            except BaseException as error:
                step = plan.throw(error)
            else:
                step = plan.send(result)
    except StopIteration as done:
        return done.value


def _blocking_method(plan: Callable[..., operations.Plan[_T]]) -> Callable[..., _T]:
    def method(*args: Any, **kwargs: Any) -> _T:
        return _run(plan(*args, **kwargs))

    return method


class RemoteLayer(operations.LayerOperations, make_method=_blocking_method):
    """A named layer on the server. Arrays go in as NumPy, CuPy or torch; results come back as NumPy.

    Results have the input's dtype whatever the wire dtype was; weight and
    bias gradients and state tensors have the layer's param dtype. ``info``
    (``version``, ``num_batches_tracked``) follows what the calls report.
    """


class NormClient(operations.ClientOperations, make_method=_blocking_method):
    """A blocking connection to a normserve server.

    ``timeout`` (seconds) applies to every call unless the call passes its
    own; ``wire_dtype`` (``None`` = each array's own dtype, or ``"float16"``,
    ``"bfloat16"``, ...) is the default dtype tensors travel in; ``retry``
    resends idempotent calls that fail with UNAVAILABLE. Use it as a context
    manager, or call :meth:`close`.

    Security: ``token`` is sent as ``authorization: Bearer <token>`` on every
    call. ``tls=True`` (implied by any of the next arguments) uses TLS;
    ``ca_cert`` verifies the server (default: the system's roots);
    ``client_cert`` and ``client_key`` answer a server that requires mutual
    TLS; ``server_name`` is the name in the server's certificate when the
    target address differs. PEM arguments are bytes or file paths.
    """

    _grpc = grpc
    _handle = RemoteLayer
    _sleep = staticmethod(time.sleep)

    def __enter__(self) -> NormClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _statistics_pipeline(self) -> StatisticsPipeline:
        """This client's statistics-mode training updates in flight (made on first use): how
        ``mode="statistics"`` modules send their updates off the step's critical path
        (:mod:`normserve.client.statistics_pipeline`)."""
        with _PIPELINE_MADE:
            if self._pipeline is None:
                self._pipeline = StatisticsPipeline(self)
        return self._pipeline

    def _stream(self, rpc: Any, request: Any, **kwargs: Any) -> Any:
        assembly = protocol.AnswerAssembly(request)
        for part in rpc(self._stream_parts(request), **kwargs):
            assembly.take(part)
        return assembly.result()
