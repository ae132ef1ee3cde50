"""``normserve rebalance``: move every layer to the replica that owns it on the current ring.

Run it after changing the replicas nginx routes to (its upstream's ``server``
lines, which make the ring: tools.nginx.Ring). It asks each replica for its
own layers (directly, not through the proxy) and moves each layer that lies
on a replica other than its owner:

1. GetState on the old copy (its tensors, num_batches_tracked and version v);
2. CreateLayer on the owner with the same config (a fresh copy is at version 1,
   or the owner has one already);
3. SetState on the owner with ``expected_version`` = the owner's version when it
   is a fresh copy (1): it fails, changing nothing, when the owner's copy took a
   Train meanwhile;
4. the old copy's version is read again: if it moved past v, steps 1 and 3 run
   again (a Train that was on its way to the old owner when the ring changed);
5. DeleteLayer on the old copy, whose answer carries the version it had last.

Guarantee: no Train acknowledged by either copy is silently lost or
overwritten. The proxy routes by the new ring before the move, so calls
during the move reach the owner, which answers NOT_FOUND (nothing acknowledged)
until step 3 lands. A copy on the owner that was trained on its own (created
through the proxy during the move, or trained after an interrupted move) is
never overwritten: the layer is reported as a CONFLICT and both copies are
kept for a person to choose. If the old copy took a Train after its last
read (only a call already in flight on the old ring can), step 5 sees it and
the layer is reported as LOST with the versions involved: never silent.

Safe to rerun: a layer on its owner alone is left alone; a layer left in both
places by an interrupted run, with equal state in both, just has its old copy
deleted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from normserve.client import FailedPrecondition, NormClient, NormServeError
from normserve.tools.nginx import Ring
from normserve.v1 import normalization_pb2 as pb

__all__ = ["MAX_ATTEMPTS", "Move", "plan", "rebalance"]

#: Times step 4 may find the old copy moved on before the move gives up (reported as a conflict).
MAX_ATTEMPTS = 5


@dataclass
class Move:
    """One layer on a replica that does not own it; ``outcome`` says what became of it."""

    layer: str
    source: str
    target: str
    outcome: str = "planned"
    ok: bool = True

    def __str__(self) -> str:
        return f"{self.layer}: {self.source} -> {self.target}: {self.outcome}"


def plan(ring: Ring, layers: dict[str, list[str]]) -> list[Move]:
    """The moves that put each layer (replica -> its layer names) on its owner."""
    return [
        Move(name, replica, ring.owner(name))
        for replica, names in layers.items()
        for name in names
        if ring.owner(name) != replica
    ]


def rebalance(
    replicas: Sequence[str],
    clients: dict[str, NormClient],
    *,
    drain: Sequence[str] = (),
    dry_run: bool = False,
    out: TextIO = sys.stdout,
) -> list[Move]:
    """Move every misplaced layer to its owner on the ring of ``replicas``, and every layer of the replicas
    in ``drain`` (ones that leave the ring); ``clients`` has a client for each. Prints one line per move. A
    replica that cannot list its layers stops everything before any move (RuntimeError)."""
    ring = Ring(replicas)
    if set(drain) & set(replicas):
        raise ValueError(f"a replica cannot be drained and stay in the ring: {sorted(set(drain) & set(replicas))}")
    layers = {}
    for replica in (*replicas, *drain):
        try:
            layers[replica] = [layer.name for layer in clients[replica].list_layers()]
        except NormServeError as error:
            raise RuntimeError(f"{replica} did not list its layers ({error}); nothing was moved") from None
    moves = plan(ring, layers)
    for move in moves:
        if not dry_run:
            _move(move, clients[move.source], clients[move.target])
        print(move, file=out, flush=True)
    return moves


def _move(move: Move, source: NormClient, target: NormClient) -> None:
    try:
        move.outcome = _copy_then_delete(move.layer, source, target)
    except _Problem as problem:
        move.outcome, move.ok = f"{problem.label}: {problem}", False
    except NormServeError as error:
        move.outcome, move.ok = f"FAILED ({error}); the old copy is kept", False


class _Problem(Exception):
    label = "PROBLEM"


class _Conflict(_Problem):
    """Both copies are kept: each may hold state the other lacks, and a person must choose."""

    label = "CONFLICT (both copies kept)"


class _Lost(_Problem):
    """The old copy changed after its last read and is deleted: what changed is gone."""

    label = "LOST"


def _copy_then_delete(name: str, source: NormClient, target: NormClient) -> str:
    info = source.call("GetLayer", pb.GetLayerRequest(name=name))
    state = source.call("GetState", pb.GetStateRequest(name=name))  # before the owner gets a copy: it may fail
    try:
        placed = target.call("CreateLayer", pb.CreateLayerRequest(name=name, config=info.config))
    except NormServeError as error:
        raise _Conflict(f"the owner has a layer of that name with another config ({error.details})") from None
    if placed.version == 1:  # a fresh copy (CreateLayer's version): nothing acknowledged there yet
        written = _set_state(target, state, expected_version=1)
    elif _same_state(state, target.call("GetState", pb.GetStateRequest(name=name))):
        written = placed.version  # copied by an earlier, interrupted run
    else:
        raise _Conflict(f"the owner's copy is at version {placed.version} with other state than the old copy's")
    for _ in range(MAX_ATTEMPTS):
        if source.call("GetLayer", pb.GetLayerRequest(name=name)).version == state.version:
            break
        # The old copy took a Train that was on its way when the ring changed: copy it again, unless the
        # owner's copy took one too (then SetState refuses and both are kept).
        state = source.call("GetState", pb.GetStateRequest(name=name))
        written = _set_state(target, state, expected_version=written)
    else:
        raise _Conflict(f"the old copy kept changing ({MAX_ATTEMPTS} reads); is the proxy still routing to it?")
    last = source.call("DeleteLayer", pb.DeleteLayerRequest(name=name)).layer
    if last.version != state.version:
        raise _Lost(
            f"the old copy went from version {state.version} (copied) to {last.version} before it was deleted; "
            "a call routed by the old ring was still in flight"
        )
    return f"moved (version {state.version}, {state.num_batches_tracked} batches)"


def _set_state(target: NormClient, state: pb.LayerState, expected_version: int) -> int:
    request = pb.SetStateRequest(name=state.name, expected_version=expected_version)
    for key, tensor in state.tensors.items():
        request.tensors[key].CopyFrom(tensor)
    if state.HasField("num_batches_tracked"):
        request.num_batches_tracked = state.num_batches_tracked
    try:
        return target.call("SetState", request).version
    except FailedPrecondition:
        raise _Conflict(
            f"the owner's copy took a Train while the old copy was copied (expected version {expected_version})"
        ) from None


def _same_state(a: pb.LayerState, b: pb.LayerState) -> bool:
    def content(state: pb.LayerState) -> Any:
        tensors = {key: tensor.SerializeToString(deterministic=True) for key, tensor in state.tensors.items()}
        return tensors, state.num_batches_tracked

    return content(a) == content(b)
