"""Declarative layers: a JSON file of the layers a server holds, created when it starts (``--layers-file``),
as a model repository is for Triton.

The file::

    {"layers": [
        {"name": "encoder.norm1", "kind": "layer_norm", "config": {"normalized_shape": [512]}},
        {"name": "encoder.bn", "kind": "batch_norm", "config": {"num_features": 64, "momentum": 0.01},
         "state": {"running_mean": [...], "running_var": [...], "num_batches_tracked": 100}}
    ]}

``config`` takes the kind's PyTorch constructor arguments, as the clients' ``create_layer`` does; ``state``
(optional) any of the layer's state-dict keys. Applying the file is idempotent: a layer the state directory
holds already with the same config is kept as it is (its state too: ``state`` is an *initial* state, loaded
only into a layer the file creates). A layer that exists with another config stops the start with an error
that names it: the file and the state disagree, and the server will not guess which one is meant. The whole
file is read and checked before any layer is created.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normkernels import NormError
from normserve.server.errors import LayerExists, LayerNotFound, ServiceError
from normserve.server.layer_config import build_layer, check_name
from normserve.server.registry import Registry, Unrestorable
from normserve.v1 import kinds
from normserve.v1 import normalization_pb2 as pb

__all__ = ["DeclaredLayer", "LayersFileError", "apply", "read"]

log = logging.getLogger(__name__)
_ENTRY_KEYS = {"name", "kind", "config", "state"}


class LayersFileError(ValueError):
    """A layers file that cannot be read, or that the state directory contradicts."""


@dataclass(frozen=True)
class DeclaredLayer:
    name: str
    config: pb.LayerConfig
    state: dict[str, Any]  # initial state: float arrays and num_batches_tracked (np.int64)


def _entry(index: int, entry: Any) -> DeclaredLayer:
    if not isinstance(entry, dict):
        raise ValueError(f"is a {type(entry).__name__}, not an object with name, kind, config and state")
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ValueError(f"has unknown keys {unknown}; an entry has {sorted(_ENTRY_KEYS)}")
    for key in ("name", "kind"):
        if not isinstance(entry.get(key), str):
            raise ValueError(f"needs {key!r}, a string")
    check_name(entry["name"])
    config, state = entry.get("config", {}), entry.get("state", {})
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise ValueError("config and state must be objects")
    values: dict[str, Any] = {}
    for key, value in state.items():
        if key == "num_batches_tracked":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"state.num_batches_tracked must be an integer >= 0, got {value!r}")
            values[key] = np.int64(value)
        else:
            try:
                values[key] = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                raise ValueError(f"state[{key!r}] must be a list of numbers") from None
    declared = DeclaredLayer(entry["name"], kinds.layer_config(entry["kind"], **config), values)
    build_layer(declared.config, "cpu").load_state_dict(values, strict=False)  # refused now, not half-created
    return declared


def read(path: Path) -> list[DeclaredLayer]:
    """The layers ``path`` declares, every entry checked; LayersFileError says which entry is wrong and why."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayersFileError(f"--layers-file {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list) or len(document) != 1:
        raise LayersFileError(f'--layers-file {path}: expected an object with one key, "layers", a list of layers')
    declared, names = [], set()
    for index, entry in enumerate(document["layers"]):
        shown = entry.get("name") if isinstance(entry, dict) else None
        try:
            layer = _entry(index, entry)
        except (ValueError, TypeError, ServiceError, NormError) as exc:
            raise LayersFileError(f"--layers-file {path}: layer {index} ({shown!r}) {exc}") from None
        if layer.name in names:
            raise LayersFileError(f"--layers-file {path}: layer {index} ({layer.name!r}) is declared twice")
        names.add(layer.name)
        declared.append(layer)
    return declared


async def apply(registry: Registry, declared: list[DeclaredLayer], path: Path) -> None:
    """Create each declared layer the registry lacks (with its initial state); keep those it holds with the
    same config. LayersFileError for one it holds with another config, or cannot create."""
    created = kept = 0
    for layer in declared:
        try:
            current = registry.describe(layer.name)
        except LayerNotFound:
            current = None
        if isinstance(current, Unrestorable):  # no layer's state stops a start: it answers DATA_LOSS, as without
            log.error(
                "--layers-file: layer %r is in the state directory but cannot be restored; left as it is", layer.name
            )
            continue
        try:
            _, new = await registry.create(layer.name, layer.config)
            if new and layer.state:
                await registry.set_state(layer.name, layer.state, partial=True)
        except LayerExists as exc:
            raise LayersFileError(
                f"--layers-file {path}: {exc}. The file and the state directory disagree: change the layer's "
                "entry to the config it has, or delete the layer (DeleteLayer) to have the file create it anew"
            ) from None
        except (ServiceError, ValueError) as exc:
            raise LayersFileError(f"--layers-file {path}: layer {layer.name!r}: {exc}") from None
        created += new
        kept += not new
    log.info("--layers-file %s: %d layer(s) created, %d kept as they were", path, created, kept)
