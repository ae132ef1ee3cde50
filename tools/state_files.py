"""Layer state files: what ``normserve export`` writes and ``normserve import`` reads.

Two formats, told apart by the file's extension (or ``--format``):

``pt``   ``torch.save`` of the state dict under PyTorch's keys (float tensors;
         ``num_batches_tracked`` an int64 scalar tensor): what ``module.state_dict()``
         saves, so ``module.load_state_dict(torch.load(path))`` takes it. Needs torch.
``npz``  ``numpy.savez`` of the same arrays, for a machine without torch;
         ``dict(numpy.load(path))`` is the state dict again.

A state file holds the state only, not the layer's config (a torch state dict
has none): ``import`` loads it into an existing layer, whose config
``normserve describe`` shows.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

__all__ = ["FORMATS", "StateFileError", "file_format", "read_state", "write_state"]

#: Format -> the file extensions that mean it.
_EXTENSIONS = {"pt": (".pt", ".pth"), "npz": (".npz",)}
FORMATS = tuple(_EXTENSIONS)


class StateFileError(ValueError):
    """A state file that cannot be written or read as asked."""


def file_format(path: Path, given: str | None = None) -> str:
    """``given``, or the format ``path``'s extension names."""
    if given is not None:
        return given
    for name, extensions in _EXTENSIONS.items():
        if path.suffix.lower() in extensions:
            return name
    raise StateFileError(f"{path}: name a .pt or .npz file, or say which with --format {{{','.join(FORMATS)}}}")


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise StateFileError("a .pt file needs torch (pip install torch); a .npz file needs only NumPy") from None
    return torch


@contextlib.contextmanager
def _atomically(path: Path) -> Iterator[Path]:
    """A scratch path beside ``path`` to write to; renamed over ``path`` once written (never half a file)."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield scratch
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def write_state(path: Path, state: Mapping[str, np.ndarray], given: str | None = None) -> str:
    """Write ``state`` (a client's ``state_dict()``) to ``path``; returns the format used."""
    import numpy as np

    kind = file_format(path, given)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _atomically(path) as scratch:
        if kind == "pt":
            torch = _torch()
            torch.save({key: torch.from_numpy(np.array(value)) for key, value in state.items()}, scratch)
        else:
            with open(scratch, "wb") as out:  # a file object: savez would append .npz to a name
                np.savez(out, **{key: np.asarray(value) for key, value in state.items()})
    return kind


def read_state(path: Path, given: str | None = None) -> dict[str, np.ndarray]:
    """The state dict in ``path`` (a .pt of tensors, or a .npz), as NumPy arrays."""
    import numpy as np

    kind = file_format(path, given)
    try:
        if kind == "pt":
            torch = _torch()
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code runs
            if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
                raise StateFileError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
            return {str(key): value.detach().numpy() for key, value in loaded.items()}
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except StateFileError:
        raise
    except Exception as exc:  # torch and NumPy raise many kinds for a damaged or foreign file
        raise StateFileError(f"{path} is not a readable {kind} state file: {exc}") from None
