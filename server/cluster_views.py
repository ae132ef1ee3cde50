"""Whole-cluster views for layer-sharded replicas behind a proxy: ListLayers and health of every replica.

Behind a proxy that shards layers over replicas (deploy/nginx/), a call with
no layer (ListLayers, a health check) reaches one replica, which knows only
its own layers and its own health. A replica started with ``--peers`` (the
other replicas' direct addresses) answers such a call with the cluster's view
when the proxy marked it (``x-normserve-view: cluster``, which the proxy sets
on every call it forwards; normserve.v1.routing): it asks each peer the same
question directly and without the mark, so a peer answers for itself alone
and the fan-out never recurses, then merges the answers:

* ListLayers: every replica's layers, by name, a page at a time: each replica
  answers the same page request and the pages merge into one that fits an
  answer (normserve.server.layer_pages). A peer that does not answer fails
  the call with UNAVAILABLE naming it: a list that silently missed a
  replica's layers would look like lost layers. Peers' answers are read with
  this server's own --max-message-bytes, not gRPC's default 4 MiB.
* Health Check: SERVING only when this replica and every peer are; a peer that
  does not answer counts as NOT_SERVING (logged with the reason). Watch is
  not merged: it reports the replica the proxy picked.

A call without the mark (a replica's own healthcheck, ``normserve layers
--target <replica>``, ``normserve rebalance``) gets the replica's own answer,
exactly as from a replica without ``--peers``. Cost of a merged call: one
call per peer, all at once, each bounded by ``--peer-timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from normserve.server import layer_pages, transport
from normserve.server.errors import AnswerTooLarge
from normserve.server.interceptors import same_kind
from normserve.server.logs import shorten
from normserve.v1 import normalization_pb2 as pb
from normserve.v1.routing import VIEW_CLUSTER, VIEW_HEADER

__all__ = ["MAX_PEERS", "ClusterViews", "parse_peers"]

log = logging.getLogger(__name__)

#: Most peers one replica fans out to (each merged call costs one call per peer).
MAX_PEERS = 64
_LIST_LAYERS = "/normserve.v1.Normalization/ListLayers"
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = health_pb2.HealthCheckResponse.SERVING
#: Metadata of the incoming call that its fan-out calls carry too: peers check the same token.
_FORWARDED = frozenset({"authorization"})


def parse_peers(text: str) -> tuple[str, ...]:
    """``"host:port,host:port"`` -> the addresses, checked (ValueError says what is wrong)."""
    peers = tuple(part.strip() for part in text.split(",") if part.strip())
    if len(peers) > MAX_PEERS:
        raise ValueError(f"at most {MAX_PEERS} peers, got {len(peers)}")
    for peer in peers:
        host, _, port = peer.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"peer {peer!r} is not HOST:PORT with a port in 1..65535")
    if len(set(peers)) != len(peers):
        raise ValueError(f"a peer is named twice in {text!r}")
    return peers


class ClusterViews(grpc.aio.ServerInterceptor):
    """Answers ListLayers and health checks marked by the proxy with the merged view of this replica and
    ``peers`` (see the module doc); ``timeout`` bounds each call to a peer, ``max_message_bytes`` (the
    server's own limit) each message either way."""

    def __init__(self, peers: Sequence[str], timeout: float, max_message_bytes: int = (1 << 31) - 1) -> None:
        self._peers = tuple(peers)
        self._timeout = timeout
        self._max_message_bytes = max_message_bytes
        self._channel_options = transport.peer_channel_options(max_message_bytes)
        self._channels: dict[str, grpc.aio.Channel] = {}  # opened on first use, in the server's event loop
        self._merges: dict[str, tuple[Callable[[bytes], Any], _Merge]] = {
            _LIST_LAYERS: (pb.ListLayersResponse.FromString, _all_layers),
            _HEALTH_CHECK: (health_pb2.HealthCheckResponse.FromString, _all_serving),
        }

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], details: Any
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        merge = self._merges.get(details.method)
        metadata = tuple(details.invocation_metadata or ())
        if handler is None or merge is None or (VIEW_HEADER, VIEW_CLUSTER) not in metadata:
            return handler
        parse, combine = merge
        own_answer = handler.unary_unary
        forwarded = tuple((key, value) for key, value in metadata if key in _FORWARDED)
        method = details.method

        async def merged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            own = await own_answer(request, context)
            remaining = context.time_remaining()
            timeout = self._timeout if remaining is None else max(0.0, min(self._timeout, remaining))
            asked = (self._ask(peer, method, parse, request, forwarded, timeout) for peer in self._peers)
            answers = dict(zip(self._peers, await asyncio.gather(*asked), strict=True))
            return await combine(request, own, answers, context, self._max_message_bytes)

        return same_kind(handler, merged)

    async def _ask(
        self,
        peer: str,
        method: str,
        parse: Callable[[bytes], Any],
        request: Any,
        metadata: tuple[tuple[str, str], ...],
        timeout: float,
    ) -> Any:
        """The peer's answer to ``request``, or why there is none (a str)."""
        channel = self._channels.get(peer)
        if channel is None:
            channel = self._channels[peer] = grpc.aio.insecure_channel(peer, options=self._channel_options)
        call = channel.unary_unary(
            method, request_serializer=type(request).SerializeToString, response_deserializer=parse
        )
        try:
            # wait_for_ready: a peer that was down and is back gets the whole timeout to be reconnected to
            return await call(request, timeout=timeout, metadata=metadata, wait_for_ready=True)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"no answer within {timeout:g} s (--peer-timeout)"
            return f"{error.code().name}: {shorten(error.details() or '', 200)}"


#: How a merged call combines this replica's answer with its peers' (peer -> answer, or why there is none):
#: (request, own answer, answers, context, the largest message the merged answer may be).
_Merge = Callable[[Any, Any, dict[str, Any], grpc.aio.ServicerContext, int], Awaitable[Any]]


async def _all_layers(
    request: pb.ListLayersRequest,
    own: pb.ListLayersResponse,
    answers: dict[str, Any],
    context: grpc.aio.ServicerContext,
    max_bytes: int,
) -> pb.ListLayersResponse:
    unanswered = {peer: why for peer, why in answers.items() if isinstance(why, str)}
    if unanswered:  # a list that silently missed a replica's layers would look like lost layers
        named = "; ".join(f"{peer}: {why}" for peer, why in unanswered.items())
        await context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"{len(unanswered)} replica(s) did not answer ListLayers, so the cluster's list would be incomplete "
            f"({named}); `normserve layers --target REPLICA` lists one replica's layers",
        )
    try:
        return layer_pages.merged_page([own, *answers.values()], layer_pages.page_size(request.page_size), max_bytes)
    except AnswerTooLarge as exc:  # a peer's layer this replica's --max-message-bytes cannot carry
        await context.abort(exc.code, str(exc))
        raise


async def _all_serving(
    request: health_pb2.HealthCheckRequest,
    own: health_pb2.HealthCheckResponse,
    answers: dict[str, Any],
    context: grpc.aio.ServicerContext,
    max_bytes: int,
) -> health_pb2.HealthCheckResponse:
    if own.status != _SERVING:
        return own
    for peer, answer in answers.items():
        if isinstance(answer, str) or answer.status != _SERVING:
            why = (
                answer if isinstance(answer, str) else health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
            )
            log.warning("cluster health: peer %s is not serving (%s)", peer, why)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
    return own
