"""Kept forwards: a Train's input, held so a later Gradient can name it instead of resending x.

Bounded by a byte budget that counts what a forward really keeps alive (x's
buffer and the state the Train ran on); the least recently used forward goes
first. A Gradient naming one that is gone gets FAILED_PRECONDITION and
resends x.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from normserve.server.errors import ForwardGone, ForwardTooLarge, InvalidRequest

if TYPE_CHECKING:
    from normserve.server.registry import Snapshot

__all__ = ["Forward", "ForwardCache"]


#: A kept x that views a buffer larger than itself by more than this is copied out of it.
_SLACK_BYTES = 64 << 10
#: What keeping any forward costs besides its arrays (its id, records, the array headers).
OVERHEAD_BYTES = 2 << 10


def held_bytes(array: np.ndarray) -> int:
    """Bytes that holding ``array`` keeps alive: the whole buffer it views (a received message), not only
    its elements."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if isinstance(base, memoryview):
        return memoryview(base.obj).nbytes if base.obj is not None else base.nbytes
    return max(array.nbytes, getattr(base, "nbytes", 0))


@dataclass(frozen=True)
class Forward:
    """What a Gradient needs of a Train: its layer, input, wire dtype and the state it ran on."""

    layer: str
    x: np.ndarray
    wire_dtype: int
    snapshot: Snapshot  # the layer's state from before the Train's update

    @property
    def nbytes(self) -> int:
        """Bytes this forward keeps alive: x's buffer and the state the Train ran on."""
        return held_bytes(self.x) + self.snapshot.layer.state_nbytes + OVERHEAD_BYTES


class ForwardCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self._forwards: OrderedDict[str, Forward] = OrderedDict()

    def admit(self, x: np.ndarray, state_nbytes: int) -> bool:
        """Refuse, before any work, a forward the whole budget cannot hold; True when x must be copied out of
        a much larger buffer it views (a message with other fields, which keeping the view would pin)."""
        copy = held_bytes(x) > x.nbytes + _SLACK_BYTES
        nbytes = (x.nbytes if copy else held_bytes(x)) + state_nbytes + OVERHEAD_BYTES
        if nbytes > self.budget_bytes:
            raise ForwardTooLarge(
                f"keep_forward: keeping x and the layer's state takes {nbytes} bytes but the server keeps at most "
                f"{self.budget_bytes} bytes of forwards (--forward-cache-bytes); send x with the Gradient instead"
            )
        return copy

    def keep(self, forward: Forward) -> str:
        """Hold an admitted ``forward`` (evicting the least recently used beyond the budget); its id."""
        while self._forwards and self.held_bytes + forward.nbytes > self.budget_bytes:
            _, evicted = self._forwards.popitem(last=False)
            self.held_bytes -= evicted.nbytes
        forward_id = secrets.token_hex(16)  # random: ids from before a restart never name a new forward
        self._forwards[forward_id] = forward
        self.held_bytes += forward.nbytes
        return forward_id

    def get(self, forward_id: str, layer: str) -> Forward:
        forward = self._forwards.get(forward_id)
        if forward is None:
            raise ForwardGone(
                f"forward_id {forward_id[:64]!r} is not held by the server (evicted to stay within "
                "--forward-cache-bytes, its layer deleted, or the server restarted); send x instead"
            )
        if forward.layer != layer:
            raise InvalidRequest(f"forward_id {forward_id!r} is a forward of layer {forward.layer!r}, not {layer!r}")
        self._forwards.move_to_end(forward_id)
        return forward

    def drop_layer(self, layer: str) -> None:
        for forward_id in [i for i, f in self._forwards.items() if f.layer == layer]:
            self.held_bytes -= self._forwards.pop(forward_id).nbytes
