"""CUDA sources of the fused kernels (``*.cu`` beside this file), compiled by CuPy at first use.

:func:`module` compiles them with NVRTC through :class:`cupy.RawModule`; CuPy
caches the binary per device and on disk. ``nvcc`` compiles the same files
in CI (``tests/test_fused.py``) so a syntax or type error fails there even
without a GPU.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

SOURCE_DIR = Path(__file__).resolve().parent
#: Compiler options, the same for NVRTC (CuPy) and the nvcc check.
OPTIONS = ("-std=c++17",)


def sources() -> list[Path]:
    """Every CUDA source file of the package."""
    return sorted(SOURCE_DIR.glob("*.cu"))


def source() -> str:
    """The kernels' source: the .cu files, in name order, as one translation unit."""
    return "\n".join(path.read_text() for path in sources())


@functools.lru_cache(maxsize=1)
def module() -> Any:
    """The compiled kernels (a cupy.RawModule; it compiles per device on first use)."""
    import cupy

    return cupy.RawModule(code=source(), options=OPTIONS)
