"""Routing metadata: how a proxy in front of layer-sharded replicas finds the replica that owns a layer.

Every call that acts on one layer carries the metadata (gRPC header)
``x-normserve-layer: <layer name>``; a proxy hashes it to pick the replica
(nginx: ``hash $http_x_normserve_layer consistent``, deploy/nginx/). The
Python clients add it by themselves; a client in another language adds it to
each layer-scoped call (the requests :func:`layer_of` names a layer for).
Calls without a layer (ListLayers, health, shared memory) carry none, and a
proxy may send them to any replica.

A server refuses (INVALID_ARGUMENT) a call whose header names another layer
than its request does, so a misrouted call never acts on another replica's
copy of a layer; and a call about a layer without the header that came
through the proxy (marked ``x-normserve-view: cluster``, below), which the
proxy sent to any replica.

``x-normserve-view: cluster`` is set by the proxy, never by clients: it
asks a replica for the whole cluster's view of ListLayers and health (the
replica asks its ``--peers``, without the header, and merges their answers).
"""

from __future__ import annotations

import re
from typing import Any

from normserve.v1 import normalization_pb2 as pb

__all__ = ["LAYER_HEADER", "NAME_PATTERN", "VIEW_CLUSTER", "VIEW_HEADER", "layer_of", "layers_of"]

#: Layer names (and sync group ids): what a header may carry and logs show, PyTorch module paths included.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.:/-]{1,256}")
LAYER_HEADER = "x-normserve-layer"
VIEW_HEADER = "x-normserve-view"
VIEW_CLUSTER = "cluster"

#: Requests that name their layer in ``name`` (the layer-management calls); every other request that names one
#: does so in ``layer`` (Train, Infer, Gradient and what comes after them). RegisterSharedMemory's ``name`` is a
#: region's, not a layer's: it is not in this list and has no ``layer`` field.
_NAMED_BY_NAME = frozenset(
    message.DESCRIPTOR.full_name
    for message in (
        pb.CreateLayerRequest,
        pb.GetLayerRequest,
        pb.DeleteLayerRequest,
        pb.GetStateRequest,
        pb.SetStateRequest,
        pb.RollbackRequest,
    )
)


def layers_of(request: Any) -> tuple[str, ...]:
    """Every layer a request acts on: its one layer (:func:`layer_of`), or each update's layer of a
    PushStatistics message (a stream over many layers: through a proxy, the routing header must name the
    one layer all its updates are about)."""
    if getattr(request, "DESCRIPTOR", None) is pb.PushStatisticsRequest.DESCRIPTOR:
        return tuple(dict.fromkeys(update.layer for update in request.updates))
    layer = layer_of(request)
    return () if layer is None else (layer,)


def layer_of(request: Any) -> str | None:
    """The layer a request acts on (a message, or a wire Payload of one), or None for a call about no layer."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:  # a stream's chunk, or bytes that were not a message
        return None
    if descriptor.full_name in _NAMED_BY_NAME:
        return request.name
    if "layer" in descriptor.fields_by_name:
        return request.layer
    return None
