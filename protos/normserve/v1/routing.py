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
copy of a layer.

``x-normserve-view: cluster`` is set by the proxy, never by clients: it
asks a replica for the whole cluster's view of ListLayers and health (the
replica asks its ``--peers``, without the header, and merges their answers).
"""

from __future__ import annotations

from typing import Any

from normserve.v1 import normalization_pb2 as pb

__all__ = ["LAYER_HEADER", "VIEW_CLUSTER", "VIEW_HEADER", "layer_of"]

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
