"""asyncio client: :class:`AsyncNormClient` mirrors :class:`~normserve.client.NormClient` with async methods.

Their methods are the operations of :mod:`normserve.client.operations`, carried out by :func:`_run`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc

from normserve.client import operations, protocol

__all__ = ["AsyncNormClient", "AsyncRemoteLayer"]

_T = TypeVar("_T")


async def _run(plan: operations.Plan[_T]) -> _T:
    """Carry out a plan: await what each step returns, and send its result (or throw its exception) back in."""
    try:
        step = next(plan)
        while True:
            try:
                result = await step()
            except BaseException as error:  # CancelledError too: the plan's cleanup must run
                step = plan.throw(error)
            else:
                step = plan.send(result)
    except StopIteration as done:
        return done.value


def _async_method(plan: Callable[..., operations.Plan[_T]]) -> Callable[..., Coroutine[Any, Any, _T]]:
    # A coroutine function, not one returning _run's coroutine: the plan (and its argument checks) starts
    # when the call is awaited, as with any async method.
    async def method(*args: Any, **kwargs: Any) -> _T:
        return await _run(plan(*args, **kwargs))

    return method


class AsyncRemoteLayer(operations.LayerOperations, make_method=_async_method):
    """:class:`~normserve.client.RemoteLayer` with async methods."""


class AsyncNormClient(operations.ClientOperations, make_method=_async_method):
    """:class:`~normserve.client.NormClient` for asyncio: the same arguments, coroutine methods.

    Use it as ``async with AsyncNormClient(target) as nc:`` or await :meth:`close`.
    """

    _grpc = grpc.aio
    _handle = AsyncRemoteLayer
    _sleep = staticmethod(asyncio.sleep)

    async def __aenter__(self) -> AsyncNormClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _stream(self, rpc: Any, request: Any, **kwargs: Any) -> Any:
        assembly = protocol.AnswerAssembly(request)
        async for part in rpc(self._stream_parts(request), **kwargs):
            assembly.take(part)
        return assembly.result()
