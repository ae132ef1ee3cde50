"""Build the .cu for the CPU and launch its kernels the way CuPy's RawModule does.

:func:`build` compiles the rewritten source with ``g++ -std=c++20`` into a
shared library, cached by the hash of everything that goes into it under
``build/cudasim/`` (git-ignored); :class:`SimModule` loads it with ctypes and
:meth:`SimModule.get_function` returns a callable with CuPy's
``(grid, block, args, shared_mem=0)`` signature. Each call checks its
arguments against the kernel's C signature (parsed from the preprocessed
source): the count, each array's dtype, contiguity and writability, each
scalar's exact type. CuPy checks none of these: it passes whatever bytes
it is given.

Arrays are copied into memory that ends at an inaccessible page, so a
kernel that reads or writes past an argument's end faults, and the fault
comes back as an error naming the argument.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .rewrite import Param, rewrite, signatures

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
#: Where builds are cached (NKSIM_BUILD_DIR overrides; build/ is git-ignored).
BUILD_DIR = Path(os.environ.get("NKSIM_BUILD_DIR", ROOT / "build" / "cudasim"))
CXX = os.environ.get("CXX", "g++")
INSTALL_HINT = "install g++ (12 or later): `sudo apt-get install g++` (Debian/Ubuntu), `sudo dnf install gcc-c++`"

#: Build flavors: the compiler flags beyond the common ones. NKSIM_FLAVOR picks one for the tests.
FLAVORS = {
    "release": ["-O1"],
    # Undefined behaviour (overflow, bad shifts, misaligned or null accesses) aborts with its line.
    "ubsan": ["-O1", "-g", "-fsanitize=undefined", "-fno-sanitize-recover=all", "-DNKSIM_STACK_BYTES=262144"],
    # Races between the threads of a block (a missing barrier) in any one order; needs a TSan runtime preloaded.
    "tsan": ["-O1", "-g", "-fsanitize=thread", "-DNKSIM_STACK_BYTES=262144"],
}
_COMMON = ["-std=c++20", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off", "-Wall", "-Wno-unused"]
ORDERS = {"fifo": 0, "lifo": 1, "random": 2}


class LaunchError(RuntimeError):
    """A launch the kernels or the harness refused: bad arguments, a deadlock, a fault."""


def compiler() -> str | None:
    """The C++20 compiler's path, or None when there is none."""
    path = shutil.which(CXX)
    if path is None:
        return None
    probe = subprocess.run(
        [path, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"],
        input="#include <bit>\nint main() { return std::bit_cast<int>(1.0f) != 0; }\n",
        capture_output=True,
        text=True,
    )
    return path if probe.returncode == 0 else None


@dataclass(frozen=True)
class Build:
    library: Path
    kernels: dict[str, tuple[Param, ...]]


def _run(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LaunchError(f"{what} failed:\n$ {shlex.join(cmd)}\n{done.stderr}")
    return done.stdout


@functools.lru_cache(maxsize=8)
def build(source: str, source_name: str, flavor: str = "release") -> Build:
    """Compile ``source`` (a .cu's text) for ``flavor``, or reuse the cached library built from the same inputs."""
    cxx = compiler()
    if cxx is None:
        raise LaunchError(f"no C++20 compiler ({CXX}): {INSTALL_HINT}")
    flags = _COMMON + FLAVORS[flavor]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    text = f'#include "cuda_shim.h"\n#line 1 "{source_name}"\n{rewrite(source)}\n'
    key = hashlib.sha256()
    for part in (text, version, " ".join(flags), *(p.read_text() for p in sorted(HERE.glob("*.h")))):
        key.update(part.encode() + b"\0")
    out = BUILD_DIR / f"{flavor}-{key.hexdigest()[:20]}"
    library, manifest = out / "kernels.so", out / "kernels.json"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:  # concurrent test processes build once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (library.exists() and manifest.exists()):
            unit = out / "kernels.cpp"
            unit.write_text(text)
            include = ["-I", str(HERE)]
            pre = _run([cxx, *flags[:1], *include, "-DNKSIM_SIGNATURES", "-E", "-P", str(unit)], "preprocessing")
            kernels = signatures(pre)
            unit.write_text(text + "".join(f"NKSIM_ENTRY({name})\n" for name in kernels))
            partial = out / "kernels.so.partial"
            _run([cxx, *flags, *include, "-o", str(partial), str(unit)], "compiling the kernels")
            os.replace(partial, library)
            table = {name: [p.__dict__ for p in params] for name, params in kernels.items()}
            manifest.write_text(json.dumps(table))
    table = json.loads(manifest.read_text())
    return Build(library, {name: tuple(Param(**p) for p in params) for name, params in table.items()})


@functools.lru_cache(maxsize=8)
def _library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.nksim_launch.restype = ctypes.c_int
    lib.nksim_launch.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_int,
        ctypes.c_ulonglong,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_ulonglong),
    ]
    lib.nksim_guarded_alloc.restype = ctypes.c_void_p
    lib.nksim_guarded_alloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.nksim_guarded_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


def _dims(value: Any, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise LaunchError(f"{what} must be an int or a tuple of 1 to 3 ints, not {value!r}")
    return (*(int(d) for d in dims), *(1,) * (3 - len(dims)))


class SimModule:
    """Stands in for ``cupy.RawModule(code=...)``: the same source, compiled for the CPU.

    ``order`` is the order the threads of a block (and the blocks) run in
    between barriers: ``fifo``, ``lifo`` or ``random`` (seeded from
    ``seed`` and the launch count, so a failure reproduces).
    """

    def __init__(
        self, code: str, *, name: str = "kernels.cu", order: str = "fifo", seed: int = 0, flavor: str | None = None
    ) -> None:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {sorted(ORDERS)}, not {order!r}")
        self.build = build(code, name, flavor or os.environ.get("NKSIM_FLAVOR", "release"))
        self._lib = _library(self.build.library)
        self.order, self.seed = order, seed
        self.launched: list[str] = []  # kernel names, in launch order

    def get_function(self, name: str) -> SimFunction:
        if name not in self.build.kernels:
            raise LaunchError(f"no kernel named {name!r} in the module")  # CuPy: CUDA_ERROR_NOT_FOUND
        entry = ctypes.cast(getattr(self._lib, f"nksim_entry_{name}"), ctypes.c_void_p).value
        return SimFunction(self, name, self.build.kernels[name], entry)


class _Guarded:
    """Copies of the array arguments, each ending at an inaccessible page; copied back after the launch."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib, self.regions, self.outputs = lib, [], []

    def place(self, param: Param, array: np.ndarray) -> int:
        nbytes = max(array.nbytes, 1)
        mapped = ctypes.c_size_t()
        start = self._lib.nksim_guarded_alloc(nbytes, ctypes.byref(mapped))
        if not start:
            raise MemoryError("guarded argument memory")
        self.regions.append((param.name, start, nbytes, mapped.value))
        copy = np.ctypeslib.as_array((ctypes.c_ubyte * nbytes).from_address(start))
        copy[: array.nbytes] = array.reshape(-1).view(np.uint8)
        if not param.const:
            self.outputs.append((array, copy))
        return start

    def owner(self, address: int) -> str:
        for name, start, nbytes, _ in self.regions:
            if start + nbytes <= address < start + nbytes + 4096:
                return f" (just past the end of argument {name!r}, {nbytes} bytes)"
        return " (a null pointer)" if address < 4096 else ""

    def close(self, copy_back: bool) -> None:
        if copy_back:
            for array, copy in self.outputs:
                array.reshape(-1).view(np.uint8)[...] = copy[: array.nbytes]
        for _, start, nbytes, mapped in self.regions:
            self._lib.nksim_guarded_free(start, nbytes, mapped)


class SimFunction:
    """One kernel, called as CuPy's RawKernel is: ``fn(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: SimModule, name: str, params: tuple[Param, ...], entry: int) -> None:
        self.module, self.name, self.params, self._entry = module, name, params, entry

    def _slot(self, param: Param, arg: Any, guarded: _Guarded) -> int:
        """The argument as the 8 bytes the kernel reads, after checking it against ``param``."""
        where = f"{self.name}: argument {param.name!r} ({param.ctype})"
        if param.pointer:
            if isinstance(arg, np.uint64) and arg == 0:
                return 0  # a null pointer, as CudaLauncher passes for an absent operand
            if not isinstance(arg, np.ndarray):
                raise LaunchError(f"{where} must be an array or np.uint64(0), not {type(arg).__name__}")
            if arg.dtype != np.dtype(param.dtype):
                raise LaunchError(f"{where} must be {param.dtype}, not {arg.dtype}")
            if not arg.flags.c_contiguous:
                raise LaunchError(f"{where} is not C-contiguous: the kernel would read it as if it were")
            if not param.const and not arg.flags.writeable:
                raise LaunchError(f"{where} is written by the kernel but the array is read-only")
            return guarded.place(param, arg)
        if not isinstance(arg, np.generic) or arg.dtype != np.dtype(param.dtype):
            got = arg.dtype if isinstance(arg, np.generic) else type(arg).__name__
            raise LaunchError(f"{where} must be np.{param.dtype}, not {got} (CuPy would pass its bytes as they are)")
        return int(np.frombuffer(arg.tobytes().ljust(8, b"\0"), np.uint64)[0])

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
        module = self.module
        if shared_mem:
            raise LaunchError(f"{self.name}: dynamic shared memory is not supported by the harness")
        if not isinstance(args, tuple) or len(args) != len(self.params):
            got = len(args) if isinstance(args, tuple) else type(args).__name__
            raise LaunchError(f"{self.name} takes {len(self.params)} arguments as a tuple, got {got}")
        g, b = _dims(grid, "grid"), _dims(block, "block")
        guarded = _Guarded(module._lib)
        ok = False
        try:
            slots = (ctypes.c_uint64 * max(1, len(args)))()
            for i, (param, arg) in enumerate(zip(self.params, args, strict=True)):
                slots[i] = self._slot(param, arg, guarded)
            base = ctypes.addressof(slots)
            argv = (ctypes.c_void_p * max(1, len(args)))(*(base + 8 * i for i in range(len(args))))
            err = ctypes.create_string_buffer(2048)
            fault = ctypes.c_ulonglong(0)
            seed = (module.seed * 1_000_003 + len(module.launched)) & (2**64 - 1)
            module.launched.append(self.name)
            rc = module._lib.nksim_launch(
                self._entry,
                ctypes.addressof(argv),
                (ctypes.c_uint * 3)(*g),
                (ctypes.c_uint * 3)(*b),
                ORDERS[module.order],
                seed,
                err,
                len(err),
                ctypes.byref(fault),
            )
            if rc:
                detail = guarded.owner(fault.value) if rc == 2 else ""
                raise LaunchError(f"{self.name} grid {g} block {b}, {module.order} order: {err.value.decode()}{detail}")
            ok = True
        finally:
            guarded.close(copy_back=ok)


def _poisoned_empty(shape: Any, dtype: Any = np.float64) -> np.ndarray:
    """``cupy.empty`` as the harness gives it: garbage (NaN, or all bits set) that a missed element shows."""
    out = np.empty(shape, dtype)
    out.view(np.uint8)[...] = 0xFF
    return out


def sim_launcher(
    sm_count: int, order: str = "fifo", seed: int = 0, flavor: str | None = None, source: str | None = None
) -> Any:
    """A :class:`normkernels.fused.CudaLauncher` whose kernels run on the CPU; only its construction differs.

    Its marshalling (which kernel, grid, block and arguments each launch
    gets) is the project's own; its ``cupy`` is NumPy with poisoned
    ``empty`` and its module is a :class:`SimModule` of ``cuda.source()``
    (or of ``source``: a changed copy, to show what the tests catch).
    """
    from normkernels import cuda, fused

    launcher = object.__new__(fused.CudaLauncher)
    launcher._cupy = SimpleNamespace(empty=_poisoned_empty)
    launcher.device_id = 0
    launcher.sm_count = sm_count
    code = cuda.source() if source is None else source
    launcher._module = SimModule(code, name=_source_name(), order=order, seed=seed, flavor=flavor)
    launcher._functions = {}
    return launcher


def _source_name() -> str:
    from normkernels import cuda

    paths = cuda.sources()
    return os.path.relpath(paths[0], ROOT) if len(paths) == 1 else "normkernels/cuda/*.cu"
