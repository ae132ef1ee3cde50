"""ListLayers a page at a time: how big a page may be, what its token means, and cutting one that fits.

Layers are listed sorted by name. A page holds at most ``page_size`` layers
(capped at :data:`MAX_PAGE_SIZE`) and never more than one answer may carry
(``--max-message-bytes``): a list of any length is answered in pages that
each fit, sized as they are built, rather than one message that fails at
send time after the work. A page's ``next_page_token`` is the name of its
last layer, and the next page lists the names after it, so a page is found
without state on the server and the merged pages of a cluster's replicas
(normserve.server.cluster_views) page the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from normserve.server.errors import AnswerTooLarge, InvalidRequest
from normserve.server.layer_config import NAME_PATTERN
from normserve.v1 import normalization_pb2 as pb

__all__ = ["MAX_PAGE_SIZE", "after_token", "merged_page", "page", "page_size"]

#: Most layers one ListLayers answer holds (a Layer describes itself in well under 1 KiB: a page of them
#: stays under gRPC's default 4 MiB receive limit, so clients with default channels read every page).
MAX_PAGE_SIZE = 1000
#: Bytes of an answer besides its layers (the next page token and its framing).
_PAGE_OVERHEAD_BYTES = 1 << 10
#: Bytes each listed layer adds besides its own (its field's tag and length).
_LAYER_FRAMING_BYTES = 8


def page_size(requested: int) -> int:
    """The layers a page holds for a request's ``page_size`` (0: the cap)."""
    return MAX_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def after_token(token: str) -> str:
    """The name a request's ``page_token`` says to list after ("" for the first page); a token this server
    cannot have given is INVALID_ARGUMENT."""
    if token and not NAME_PATTERN.fullmatch(token):
        raise InvalidRequest(
            f"page_token {token[:64]!r} is not one this server gives: send back the next_page_token of the "
            "previous ListLayers answer unchanged, or leave it empty for the first page"
        )
    return token


def page(layers: Iterable[pb.Layer], size: int, max_bytes: int, more: bool = False) -> pb.ListLayersResponse:
    """The first of ``layers`` (sorted by name) that fit a page of ``size`` layers and ``max_bytes`` bytes,
    with a next page token when some are left (or ``more`` says others follow them). Only the layers taken
    are looked at, and one more."""
    response = pb.ListLayersResponse()
    room = max_bytes - _PAGE_OVERHEAD_BYTES
    for layer in layers:
        cost = layer.ByteSize() + _LAYER_FRAMING_BYTES
        if len(response.layers) == size or cost > room:
            if not response.layers:
                raise AnswerTooLarge(
                    f"layer {layer.name!r}'s description takes {cost} bytes, more than an answer may carry "
                    f"(--max-message-bytes {max_bytes}); raise that limit to list it"
                )
            more = True
            break
        room -= cost
        response.layers.append(layer)
    if more and response.layers:
        response.next_page_token = response.layers[-1].name
    return response


def merged_page(answers: Sequence[pb.ListLayersResponse], size: int, max_bytes: int) -> pb.ListLayersResponse:
    """One page of the union of several servers' pages for the same request (their layers are disjoint).

    A server whose page was followed by more has listed only names up to its page's last: the merged page
    stops there too, or it would skip that server's next names.
    """
    ends = [answer.layers[-1].name for answer in answers if answer.next_page_token and answer.layers]
    end = min(ends, default=None)
    layers = sorted((layer for answer in answers for layer in answer.layers), key=lambda layer: layer.name)
    listed = (layer for layer in layers if end is None or layer.name <= end)
    return page(listed, size, max_bytes, more=bool(ends))
