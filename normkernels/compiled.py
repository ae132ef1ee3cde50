"""The compiled CPU path: fused, multi-threaded numba kernels behind the CPU layers.

Same entry points and results as :mod:`normkernels.core` (``forward_train``,
``forward_eval``, ``backward``, and ``moments``, ``grad_sums``, ``grad_input``
for synchronized batch norm). The geometry and the per-statistic math are
:mod:`normkernels.fused`'s, as for the CUDA kernels; :class:`CpuLauncher`
runs them on the kernels of :mod:`normkernels.cpu_kernels` instead:

* training forward: per-line kinds (instance, group, layer, RMS norm) read
  each line once for its statistics and normalize it while it is in cache;
  batch norm makes one reduction pass and one elementwise pass;
* eval forward: one elementwise pass;
* training backward: per-line kinds in one pass (a line's statistics, its
  co-moments with dy, its dx; dweight and dbias in per-thread partials),
  batch norm in two (co-moments of x and dy, then dx).

The NumPy core stays the reference and the fallback: ``NORMKERNELS_CPU=numpy``
selects it, and so does a missing numba (see :func:`backend`).

Configuration (environment):

``NORMKERNELS_CPU``        ``numba`` (default) or ``numpy``.
``NORMKERNELS_THREADS``    threads per kernel call (default: every core numba sees).
``NORMKERNELS_CACHE_DIR``  where compiled kernels are cached (default: the user's cache folder,
                           then a folder in the temp dir when that is not writable).
``NORMKERNELS_COMPILE_PROCESSES``  processes a first start (a cold cache) compiles in (default: one per
                           core, at most 4; :mod:`normkernels.parallel_compile`).

Compilation never happens inside a call: :func:`warm_up` compiles every
signature (or loads it from the cache) and then turns compilation off. The
server calls it before it reports SERVING; other programs get it on their
first call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import math
import os
import site
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from normkernels import core, fused, parallel_compile
from normkernels.backend import Array

__all__ = [
    "CheckedMoments",
    "CpuLauncher",
    "WarmUp",
    "backend",
    "backward",
    "cache_dir",
    "enabled",
    "forward_eval",
    "forward_train",
    "grad_input",
    "grad_sums",
    "moments",
    "set_threads",
    "threads",
    "track_running",
    "warm_up",
]

log = logging.getLogger("normkernels")

ENV_SWITCH = "NORMKERNELS_CPU"
ENV_THREADS = "NORMKERNELS_THREADS"
ENV_CACHE = "NORMKERNELS_CACHE_DIR"
#: While warm_up compiles, it logs its progress this often (seconds).
PROGRESS_SECONDS = 10.0

#: Below this many bytes touched, a kernel runs on the calling thread alone: waking the other
#: threads costs more than they save (measured with benchmarks/kernels.py --calibrate on 2 cores: on
#: a quiet machine they start to pay at 256 KiB, on a shared one at 1-2 MiB; LayerNorm 4x8192 and
#: 128x768 forward, 256 and 768 KiB, took 19 and 32 us on one thread against 25 and 43 us on two).
PARALLEL_MIN_BYTES = 896 << 10
#: Lines shorter than this run as rows of whole periods of the index map (see cpu_kernels.normalize) ...
_SHORT_LINE = 64
#: ... when a period has at most this many elements.
_MAX_PERIOD = 1 << 16
#: From this many bytes touched, a kernel splits its work into SPLITS_PER_THREAD chunks per thread,
#: handed out one at a time (cpu_kernels: on a shared machine, a thread that lost its core holds up one).
BALANCE_MIN_BYTES = 4 << 20
SPLITS_PER_THREAD = 4
#: Reductions over lines shorter than this run per column, on tiles of about this many elements
#: (128 KiB of float32: the tile stays in L2 for its second pass).
_COLUMNS_BELOW = 64
_TILE = 32768
_TILE_WIDTH = 1024
#: Channels-first tiles (cpu_kernels.forward_pixels) hold about this many bytes of x: with dy, the
#: backward's tile stays in a 1 MiB L2 between its statistics and its outputs (256 KiB beat 64 and
#: 128 KiB on the LayerNorm2d shapes of benchmarks/kernels.py: fewer, longer pixel rows).
_PIXEL_TILE_BYTES = 256 << 10
#: Pixels per tile are a multiple of this (the float32 vector width of AVX-512) unless the sample has fewer.
_PIXEL_ALIGN = 16


# --------------------------------------------------------------------------- configuration
def wanted() -> bool:
    """Whether the environment asks for the compiled path (NORMKERNELS_CPU is not ``numpy``)."""
    return os.environ.get(ENV_SWITCH, "numba").strip().lower() != "numpy"


def enabled() -> bool:
    """Whether CPU layers run on the compiled kernels: wanted, and numba imports and starts its threads."""
    return wanted() and kernels() is not None and _failure is None


def backend() -> ModuleType:
    """The math module of new CPU layers: this one when :func:`enabled`, else :mod:`normkernels.core`."""
    return sys.modules[__name__] if enabled() else core


def threads() -> int:
    """Threads one kernel call may use: NORMKERNELS_THREADS, at most the threads numba started with."""
    import numba

    most = int(numba.config.NUMBA_NUM_THREADS)
    text = os.environ.get(ENV_THREADS, "").strip()
    if not text:
        return most
    try:
        wanted_threads = int(text)
    except ValueError:
        raise ValueError(f"{ENV_THREADS}={text!r}: expected a positive integer") from None
    if wanted_threads < 1:
        raise ValueError(f"{ENV_THREADS}={text!r}: expected a positive integer")
    return min(wanted_threads, most)


def set_threads(count: int | None) -> None:
    """Threads per kernel call from now on (None: NORMKERNELS_THREADS or every core), at most numba's pool."""
    import numba

    most = int(numba.config.NUMBA_NUM_THREADS)
    if count is not None and count < 1:
        raise ValueError(f"threads per kernel call must be at least 1, got {count}")
    if warm_up() is not None:
        _LAUNCHER[:] = [CpuLauncher(threads() if count is None else min(count, most))]


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return False
    return True


def cache_dir() -> Path:
    """Where compiled kernels are cached: a writable folder (created if needed).

    NORMKERNELS_CACHE_DIR (or numba's own NUMBA_CACHE_DIR) when set, else
    ``$XDG_CACHE_HOME/normkernels`` (``~/.cache/normkernels``). Never next to the
    installed sources: site-packages may be read-only (the Docker image). When
    the folder cannot be written, a per-user folder in the temp dir is used.
    """
    configured = os.environ.get(ENV_CACHE) or os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        first = Path(configured).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        first = Path(base) / "normkernels"
    if _writable_dir(first):
        return first
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    fallback = Path(tempfile.gettempdir()) / f"normkernels-cache-{uid}"
    if configured:
        log.warning("kernel cache folder %s is not writable; using %s", first, fallback)
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _load_tbb() -> bool:
    """Load pip's libtbb so numba's TBB threading layer finds it; True when TBB is loaded.

    The ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, which the dynamic
    loader does not search; numba's layer then reports "no threading layer". A
    library loaded once by path (RTLD_GLOBAL) satisfies the later lookup by name.
    """
    names = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}
    name = names.get(sys.platform)
    if name is None:
        return False
    prefixes = [sys.prefix, sys.base_prefix, site.getuserbase()]
    candidates = [name] + [
        str(Path(p) / ("Library/bin" if sys.platform == "win32" else "lib") / name) for p in prefixes
    ]
    for candidate in candidates:
        with contextlib.suppress(OSError):
            ctypes.CDLL(candidate, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            return True
    return False


_lock = threading.Lock()
_kernels: ModuleType | None = None
_failure: str | None = None  # why the compiled path is off (numba missing, no threading layer)
_warm: WarmUp | None = None
_LAUNCHER: list[CpuLauncher] = []  # the one launcher, made by warm_up (set_threads replaces it)


class WarmUp(NamedTuple):
    """What :func:`warm_up` did."""

    seconds: float
    signatures: int  # kernel signatures ready
    compiled: int  # of which compiled now (the rest came from the cache)
    cache_dir: str
    threading_layer: str
    threads: int
    processes: int  # that compiled: the helpers that filled a cold cache, and this one if it compiled any


def configure_numba() -> None:
    """Where numba caches (:func:`cache_dir`) and which threading layer it starts: before any kernel exists.

    :mod:`normkernels.cpu_kernels` calls it first thing, so the kernels are configured however they are imported.
    """
    import numba

    numba.config.CACHE_DIR = str(cache_dir())
    # Numba's default layer (workqueue) aborts the process when parallel kernels are called from
    # several threads at once, as the server's kernel threads do: pin a thread-safe one. TBB comes
    # from pip (the `tbb` dependency); GNU OpenMP from the system where no TBB wheel exists.
    forced = os.environ.get("NUMBA_THREADING_LAYER", "").strip().lower()
    if forced in ("tbb", "omp"):
        numba.config.THREADING_LAYER = forced
    else:
        numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "omp"


def kernels() -> ModuleType | None:
    """:mod:`normkernels.cpu_kernels` (numba configured); None when numba is not importable (logged once)."""
    global _kernels, _failure
    if _kernels is not None or _failure is not None:
        return _kernels
    with _lock:
        if _kernels is None and _failure is None:
            try:
                from normkernels import cpu_kernels
            except ImportError as exc:  # numba missing: the documented fallback is the NumPy core
                _failure = f"numba is not importable ({exc})"
                log.warning("compiled CPU kernels are off: %s; CPU layers run on NumPy", _failure)
                return None
            _kernels = cpu_kernels
    return _kernels


def warm_up() -> WarmUp | None:
    """Compile (or load from the cache) every kernel signature and start the threads; None when off.

    Afterwards the kernels never compile again: a call whose argument types
    matched no signature would raise rather than compile inside a request.
    Idempotent and thread-safe; returns what the first call did.
    """
    global _warm, _failure
    if _warm is not None or not wanted():
        return _warm
    k = kernels()
    if k is None:
        return None
    with _lock:
        if _warm is not None or _failure is not None:
            return _warm
        import numba

        start = reported = time.perf_counter()
        count = compiled = 0
        total = sum(map(len, k.SIGNATURES.values()))
        filled = _fill_cache(k)
        by_helpers, here = set(filled.compiled), 0  # kernels the helpers compiled; signatures compiled here
        for name, signatures in k.SIGNATURES.items():
            kernel = k.KERNELS[name]
            for signature in signatures:
                before = len(kernel.stats.cache_hits)
                kernel.compile(signature)
                missed = len(kernel.stats.cache_hits) == before  # not a cache hit: it compiled here
                here += missed
                compiled += missed or name in by_helpers
                count += 1
                if time.perf_counter() - reported >= PROGRESS_SECONDS:  # a first start: minutes of compiling
                    reported = time.perf_counter()
                    log.info(
                        "CPU kernels: %d of %d signatures ready after %.0f s (%d compiled, cached in %s for later "
                        "starts)",
                        count,
                        total,
                        reported - start,
                        compiled,
                        numba.config.CACHE_DIR,
                    )
            kernel.disable_compile()
        try:
            _start_threads(k)
            layer = numba.threading_layer()
        except Exception as exc:  # numba raises ValueError (no layer) or RuntimeError
            _failure = f"numba could not start a thread-safe threading layer ({exc})"
            log.warning("compiled CPU kernels are off: %s; CPU layers run on NumPy", _failure)
            return None
        if layer not in ("tbb", "omp"):  # never the workqueue: see kernels()
            _failure = f"numba chose the {layer!r} threading layer, which is not thread-safe"
            log.warning("compiled CPU kernels are off: %s; CPU layers run on NumPy", _failure)
            return None
        _LAUNCHER[:] = [CpuLauncher(threads())]
        _warm = WarmUp(
            time.perf_counter() - start,
            count,
            compiled,
            str(numba.config.CACHE_DIR),
            layer,
            _LAUNCHER[0].sm_count,
            filled.helpers + (here > 0),
        )
    log.info(
        "CPU kernels ready in %.1f s: %d signatures (%d compiled by %d processes, the rest from %s), "
        "threading layer %s, %d threads per call",
        _warm.seconds,
        _warm.signatures,
        _warm.compiled,
        _warm.processes,
        _warm.cache_dir,
        _warm.threading_layer,
        _warm.threads,
    )
    return _warm


def _fill_cache(k: ModuleType) -> parallel_compile.Filled:
    """On a cold cache, compile the missing kernels in helper processes first (:mod:`normkernels.parallel_compile`)."""
    import numba

    names, count = parallel_compile.missing(k), parallel_compile.processes()
    if len(names) < 2 or count < 2:
        return parallel_compile.Filled([], 0)
    log.info(
        "CPU kernels: compiling %d of %d kernels in %d processes (a first start; cached in %s for later starts)",
        len(names),
        len(k.KERNELS),
        min(count, len(names)),
        numba.config.CACHE_DIR,
    )
    return parallel_compile.fill_cache(names, count)


def _start_threads(k: ModuleType) -> None:
    """One parallel call over two chunks: numba loads its threading layer and starts its pool now."""
    x = np.zeros(8, np.float32)
    k.reduce_rows(x, x, 0, 1, 2, 4, 1, np.empty((2, 4)), np.empty((4, 2), np.float32), 2)


def _launcher() -> CpuLauncher | None:
    """The launcher, after warm-up; None when the compiled path is off (the callers use core)."""
    if _warm is None and warm_up() is None:
        return None
    return _LAUNCHER[0]


# --------------------------------------------------------------------------- the launcher
def _chunks(items: int, nbytes: int, most: int) -> int:
    """How many ranges of ``items`` run in parallel: one below PARALLEL_MIN_BYTES, one per thread below
    BALANCE_MIN_BYTES, else SPLITS_PER_THREAD per thread."""
    if nbytes < PARALLEL_MIN_BYTES or most == 1:
        return 1
    return max(1, min(items, most if nbytes < BALANCE_MIN_BYTES else most * SPLITS_PER_THREAD))


def _run(kernel: Any, *args: Any) -> Any:
    """``kernel(*args)``, whose last argument is its chunk count: several chunks go to the threads one at
    a time (numba's chunk size 1, for this call on this thread), not as one static range per thread."""
    if args[-1] == 1:
        return kernel(*args)
    import numba

    with numba.parallel_chunksize(1):
        return kernel(*args)


@functools.lru_cache(maxsize=64)
def _constant(value: float, n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of ``n`` times ``value``: the weight, bias or statistic that is absent."""
    a = np.full(n, value, dtype=dtype)
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=64)
def _scalar(value: float, dtype: np.dtype) -> np.generic:
    """``value`` as a scalar of the kernels' dtype (eps: a few per process; dtype.type() costs 0.4 us a call)."""
    return dtype.type(value)


def _vector(a: Array | None, n: int, fill: float, dtype: np.dtype) -> np.ndarray:
    """``a`` as the kernels take it (1-D, contiguous, the compute dtype), or ``n`` times ``fill`` when absent."""
    if a is None:
        return _constant(fill, n, dtype)
    if a.dtype == dtype and a.flags.c_contiguous:  # the usual case, at a third of the cost
        return a if a.ndim == 1 else a.reshape(-1)
    return np.ascontiguousarray(a.reshape(-1), dtype=dtype)


class _Lines(NamedTuple):
    """What the kernels need to know of an elementwise pass besides its arrays (cached per geometry)."""

    lines: int
    K: int
    period: int  # lines per period of the map when lines are short (cpu_kernels.normalize's P), else 0
    sdiv: int
    smod: int
    pmod: int
    pmul: int
    pdiv: int
    params: int  # how many parameters the map addresses


@functools.lru_cache(maxsize=256)
def _lines(ew: fused.Elementwise, imap: fused.IndexMap) -> _Lines:
    lines, K = ew.lines, ew.K
    params = (imap.pmod - 1) * imap.pmul + (0 if imap.pdiv == 0 else (K - 1) // imap.pdiv) + 1
    period = 0
    if K < _SHORT_LINE:
        p = math.lcm(imap.sdiv * imap.smod, imap.pmod)
        # Spreading a period's factors writes as much as a period of x: with one period (batch norm of
        # one sample) that doubles the pass (1x512x7x7: 26 us against 18 a line at a time), unless the
        # lines are so short that a line at a time is all per-line work.
        one_period = lines < 2 * p and K >= _SHORT_LINE // 2
        period = p if p * K <= _MAX_PERIOD and lines % p == 0 and not one_period else 0
    return _Lines(lines, K, period, imap.sdiv, imap.smod, imap.pmod, imap.pmul, imap.pdiv, params)


class _Pixels(NamedTuple):
    """x as (A, C, S) with one statistic per (a, s), over the C channels, in tiles of P pixels."""

    A: int
    C: int
    S: int
    P: int

    @property
    def tiles(self) -> int:
        return self.A * -(-self.S // self.P)


@functools.lru_cache(maxsize=256)
def _pixels(plan: core.Plan, itemsize: int) -> _Pixels | None:
    """The channels-first geometry of ``plan``, or None when it is not one.

    One: the statistics reduce a contiguous block of inner axes and keep the
    rest, including some after it (LayerNorm2d's channels, between the sample
    and the pixels), and the parameters vary over exactly the reduced block.
    (A reduction that runs to the last axis is a line: ``fused.geometry``'s.)
    """
    view, stat, param = fused._squeeze(plan.view, plan.stat_shape, plan.param_shape)
    reduced = [i for i, s in enumerate(stat) if s == 1]  # squeezed: every axis left is longer than 1
    if not reduced or reduced[-1] == len(view) - 1 or reduced != list(range(reduced[0], reduced[-1] + 1)):
        return None
    lo, hi = reduced[0], reduced[-1] + 1
    if param != tuple(n if lo <= i < hi else 1 for i, n in enumerate(view)):
        return None
    A, C, S = math.prod(view[:lo]), math.prod(view[lo:hi]), math.prod(view[hi:])
    widest = max(_PIXEL_ALIGN, _PIXEL_TILE_BYTES // (itemsize * C))
    per_tile = -(-S // -(-S // widest))  # as many pixels in every tile but the last
    return _Pixels(A, C, S, min(S, -(-per_tile // _PIXEL_ALIGN) * _PIXEL_ALIGN))


class _Call(NamedTuple):
    """What every call of a plan needs besides its arrays (see :func:`_call`)."""

    geo: fused.Geometry | None
    pixels: _Pixels | None  # channels first (geo is None)
    train: _Lines | None  # geo's elementwise pass with the batch's statistics
    eval: _Lines | None  # ... with per-parameter (running) statistics; None for group norm


@functools.lru_cache(maxsize=256)
def _call(plan: core.Plan, sm_count: int, dtype: np.dtype) -> _Call:
    """The geometry of ``plan``'s calls, looked up once a call: a small input's call is bound by lookups."""
    geo = fused.geometry(plan, sm_count)
    if geo is None:
        return _Call(None, _pixels(plan, dtype.itemsize), None, None)
    ew = geo.elementwise
    return _Call(geo, None, _lines(ew, geo.train_map), None if geo.eval_map is None else _lines(ew, geo.eval_map))


def _param_partials(chunks: int, n: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed per-chunk dweight and dbias partials, which the backward kernels add to."""
    return np.zeros((chunks, n), dtype), np.zeros((chunks, n), dtype)


@dataclass(frozen=True)
class CpuLauncher:
    """:class:`normkernels.fused.Launcher` on the numba kernels; arrays are NumPy, in the compute dtype.

    ``sm_count`` (the geometry's unit of parallelism) is the kernels' thread count.
    """

    sm_count: int

    def reduce(self, op: str, plan: fused.Reduction, x: Array, dy: Array | None = None, **o: Any) -> np.ndarray:
        if op not in ("moments", "comoments"):  # the weighted and grad_sums reductions: compiled.backward's lines
            raise NotImplementedError(f"CpuLauncher has no {op!r} reduction")
        return self.moments(x, dy, plan.A, plan.B, plan.K, np.dtype(o["dtype"]))[: fused.OUTPUTS[op]]

    def moments(self, x: Array, g: Array | None, A: int, B: int, K: int, dtype: np.dtype) -> np.ndarray:
        """Per group b of the lines a * B + b: mean, variance, sum(g), co-moment sum((x - mean) * g)."""
        k = _kernels
        x = x.reshape(-1)
        has_g = g is not None
        g = x if g is None else g.reshape(-1)
        nbytes = x.nbytes * (1 + has_g)
        out = np.empty((4, B), dtype)
        if K >= _COLUMNS_BELOW or A == 1:
            nseg = -(-K // k.SEGMENT)
            parts = np.empty((A * B * nseg, 4), np.float64)
            chunks = _chunks(A * B * nseg, nbytes, self.sm_count)
            _run(k.reduce_rows, x, g, int(has_g), A, B, K, nseg, parts, out, chunks)
        else:
            width = min(B * K, _TILE_WIDTH)
            R = max(1, _TILE // width)
            parts = np.empty((-(-A // R) * B * K, 4), np.float64)
            chunks = _chunks(-(-A // R) * -(-(B * K) // width), nbytes, self.sm_count)
            _run(k.reduce_cols, x, g, int(has_g), A, B, K, R, width, parts, out, chunks)
        return out

    @staticmethod
    def _statistics(g: _Lines, o: dict[str, Any], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, Any, np.ndarray]:
        """The elementwise kernels' mean, var, eps and weight arguments."""
        return (
            _vector(o.get("mean"), g.smod, 0.0, dtype),
            _vector(o["var"], g.smod, 1.0, dtype),
            _scalar(o["eps"], dtype),
            _vector(o.get("weight"), g.params, 1.0, dtype),
        )

    def normalize(self, x: Array, y: Array, ew: fused.Elementwise, imap: fused.IndexMap, **o: Any) -> None:
        dtype, g = np.dtype(o["dtype"]), o.get("lines") or _lines(ew, imap)
        stats = self._statistics(g, o, dtype)
        bias = _vector(o.get("bias"), g.params, 0.0, dtype)
        _run(
            _kernels.normalize,
            x.reshape(-1),
            y.reshape(-1),
            *g[:8],
            *stats,
            bias,
            _chunks(g.lines, 2 * x.nbytes, self.sm_count),
        )

    def grad_input(self, x: Array, dy: Array, dx: Array, ew: fused.Elementwise, imap: fused.IndexMap, **o: Any) -> None:
        dtype, g = np.dtype(o["dtype"]), o.get("lines") or _lines(ew, imap)
        _run(
            _kernels.grad_input,
            x.reshape(-1),
            dy.reshape(-1),
            dx.reshape(-1),
            *g[:8],
            *self._statistics(g, o, dtype),
            _vector(o.get("c1"), g.smod, 0.0, dtype),
            _vector(o.get("c2"), g.smod, 0.0, dtype),
            int(o.get("c2") is not None),  # training: the statistics are the batch's own
            _chunks(g.lines, 3 * x.nbytes, self.sm_count),
        )

    def forward_lines(
        self,
        x: Array,
        y: Array,
        ew: fused.Elementwise,
        imap: fused.IndexMap,
        *,
        weight: Array | None,
        bias: Array | None,
        eps: float,
        dtype: np.dtype,
        center: bool,
        mean_out: np.ndarray,
        var_out: np.ndarray,
        lines: _Lines | None = None,
    ) -> int:
        """As the CUDA launcher's; returns how many statistics written are NaN or Inf.

        The operands are named, not a dict: a small input's whole call costs a few microseconds.
        """
        g = lines or _lines(ew, imap)
        return _run(
            _kernels.forward_lines,
            x.reshape(-1),
            y.reshape(-1),
            g.lines,
            g.K,
            *g[3:8],
            _vector(weight, g.params, 1.0, dtype),
            _vector(bias, g.params, 0.0, dtype),
            _scalar(eps, dtype),
            int(center),
            mean_out,
            var_out,
            _chunks(g.lines, 2 * x.nbytes, self.sm_count),
        )

    def backward_lines(
        self,
        x: Array,
        dy: Array,
        dx: Array,
        ew: fused.Elementwise,
        imap: fused.IndexMap,
        weight: Array | None,
        eps: float,
        dtype: np.dtype,
        center: bool,
        lines: _Lines | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training backward of the per-line kinds in one pass; returns dweight and dbias (flat)."""
        g = lines or _lines(ew, imap)
        chunks = _chunks(g.lines, 3 * x.nbytes, self.sm_count)
        dw, db = _param_partials(chunks, g.params, dtype)
        _run(
            _kernels.backward_lines,
            x.reshape(-1),
            dy.reshape(-1),
            dx.reshape(-1),
            g.lines,
            g.K,
            g.pmod,
            g.pmul,
            g.pdiv,
            _vector(weight, g.params, 1.0, dtype),
            _scalar(eps, dtype),
            int(center),
            dw,
            db,
            chunks,
        )
        return dw.sum(axis=0), db.sum(axis=0)

    def forward_pixels(
        self,
        x: Array,
        y: Array,
        px: _Pixels,
        weight: Array | None,
        bias: Array | None,
        eps: float,
        dtype: np.dtype,
        center: bool,
        mean_out: np.ndarray,
        var_out: np.ndarray,
    ) -> int:
        """Training forward of a channels-first plan; returns how many statistics written are NaN or Inf."""
        return _run(
            _kernels.forward_pixels,
            x.reshape(-1),
            y.reshape(-1),
            *px,
            _vector(weight, px.C, 1.0, dtype),
            _vector(bias, px.C, 0.0, dtype),
            _scalar(eps, dtype),
            int(center),
            mean_out,
            var_out,
            _chunks(px.tiles, 2 * x.nbytes, self.sm_count),
        )

    def backward_pixels(
        self,
        x: Array,
        dy: Array,
        dx: Array,
        px: _Pixels,
        weight: Array | None,
        eps: float,
        dtype: np.dtype,
        center: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Training backward of a channels-first plan in one pass; returns dweight and dbias (per channel)."""
        chunks = _chunks(px.tiles, 3 * x.nbytes, self.sm_count)
        dw, db = _param_partials(chunks, px.C, dtype)
        _run(
            _kernels.backward_pixels,
            x.reshape(-1),
            dy.reshape(-1),
            dx.reshape(-1),
            *px,
            _vector(weight, px.C, 1.0, dtype),
            _scalar(eps, dtype),
            int(center),
            dw,
            db,
            chunks,
        )
        return dw.sum(axis=0), db.sum(axis=0)


# --------------------------------------------------------------------------- the math
def _compute(a: Array, dtype: np.dtype) -> np.ndarray:
    """``a`` as a C-contiguous array of the compute dtype (no copy when it is one already).

    The kernels read and write only their compute dtype; float16 (and float32
    for float64 layers) is converted here, and the caller converts back.
    """
    return np.ascontiguousarray(a, dtype=dtype)


#: Batch statistics that the kernel which computed them found finite (see :class:`normkernels.core.CheckedMoments`).
CheckedMoments = core.CheckedMoments


def forward_train(
    xv: Array, plan: core.Plan, weight: Array | None, bias: Array | None, eps: float, dtype: np.dtype
) -> tuple[Array, core.Moments]:
    """As :func:`core.forward_train`."""
    launcher = _LAUNCHER[0] if _warm is not None else _launcher()
    if launcher is None:
        return core.forward_train(xv, plan, weight, bias, eps, dtype)
    xv = _compute(xv, dtype)
    geo, px, lines, _ = _call(plan, launcher.sm_count, dtype)
    if geo is None and px is None:
        return fused.forward_train(xv, plan, weight, bias, eps, dtype, launcher=launcher)
    # fused.forward_train's launches, without its array-module and layout checks (xv is this module's
    # own: contiguous, in the compute dtype): small inputs are bound by them.
    y = fused._output(xv)
    non_finite = None  # how many statistics are NaN or Inf, where the kernel counted them
    if px is not None:  # channels first: one kernel call, which checks the statistics too
        mean, var = np.empty(px.A * px.S, dtype), np.empty(px.A * px.S, dtype)
        non_finite = launcher.forward_pixels(xv, y, px, weight, bias, eps, dtype, plan.center, mean, var)
    elif geo.per_line_forward:  # the same, a line per statistic
        ew, imap = geo.elementwise, geo.train_map
        mean, var = np.empty(ew.lines, dtype), np.empty(ew.lines, dtype)
        non_finite = launcher.forward_lines(
            xv,
            y,
            ew,
            imap,
            weight=weight,
            bias=bias,
            eps=eps,
            dtype=dtype,
            center=plan.center,
            mean_out=mean,
            var_out=var,
            lines=lines,
        )
    else:
        mean, var = fused.batch_moments(launcher, geo, plan, xv, dtype)
        o = {"mean": mean, "var": var, "lines": lines}
        launcher.normalize(xv, y, geo.elementwise, geo.train_map, eps=eps, weight=weight, bias=bias, dtype=dtype, **o)
    moments = CheckedMoments if non_finite == 0 else core.Moments
    return y, moments(mean.reshape(plan.stat_shape) if plan.center else None, var.reshape(plan.stat_shape))


def track_running(
    stats: core.Moments, running_mean: Array, running_var: Array, rows: int, var_scale: float, factor: float
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """A training batch's checks and running-statistics update in one compiled call (see
    ``cpu_kernels.track_running``): ``(status, running_mean, running_var, batch_mean, batch_var)``,
    status 0 (done), 1 (the batch's statistics are not finite) or 2 (the new running statistics
    are not). None where the layer's NumPy update must run instead: the statistics are in another
    dtype than the running ones (float64 data into float32 state), or the kernels are off."""
    mean, var = stats.mean, stats.var
    dtype = running_mean.dtype
    if _warm is None or mean is None or not (mean.dtype == var.dtype == running_var.dtype == dtype):
        return None
    channels = running_mean.size
    out = np.empty((4, channels), dtype)
    status = _kernels.track_running(
        _vector(mean, mean.size, 0.0, dtype),
        _vector(var, var.size, 0.0, dtype),
        1.0 / rows,
        float(var_scale),
        float(factor),
        _vector(running_mean, channels, 0.0, dtype),
        _vector(running_var, channels, 0.0, dtype),
        out,
    )
    return status, out[0], out[1], out[2], out[3]


def forward_eval(
    xv: Array,
    plan: core.Plan,
    stats: core.Moments,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: np.dtype,
) -> Array:
    """As :func:`core.forward_eval` (one elementwise pass)."""
    launcher = _launcher()
    if launcher is None:
        return core.forward_eval(xv, plan, stats, weight, bias, eps, dtype)
    call = _call(plan, launcher.sm_count, dtype)
    xv = _compute(xv, dtype)
    if call.eval is None:  # fused's fallbacks (core)
        return fused.forward_eval(xv, plan, stats, weight, bias, eps, dtype, launcher=launcher)
    # fused.forward_eval's launch without its flattening copies: the launcher takes the vectors as they are.
    y = fused._output(xv)
    geo = call.geo
    o = {"mean": stats.mean, "var": stats.var, "lines": call.eval}
    launcher.normalize(xv, y, geo.elementwise, geo.eval_map, eps=eps, weight=weight, bias=bias, dtype=dtype, **o)
    return y


def backward(
    xv: Array,
    dyv: Array,
    plan: core.Plan,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
    stats: core.Moments | None = None,
) -> tuple[Array, Array, Array]:
    """As :func:`core.backward`: ``(dx, dweight, dbias)``."""
    launcher = _launcher()
    if launcher is None:
        return core.backward(xv, dyv, plan, weight, eps, dtype, stats)
    xv, dyv = _compute(xv, dtype), _compute(dyv, dtype)
    geo, px, lines, _ = _call(plan, launcher.sm_count, dtype)
    if px is not None and stats is None:  # channels first, training: one pass, as for the lines below
        dx = np.empty_like(xv)
        dweight, dbias = launcher.backward_pixels(xv, dyv, dx, px, weight, eps, dtype, plan.center)
        return dx, dweight.reshape(plan.param_shape), dbias.reshape(plan.param_shape)
    # One pass per line when each line is one statistic: always for layer and RMS norm (their
    # per-column dweight would otherwise take a pass of its own), and for instance and group norm
    # when there are lines enough to share among the threads (else their split reductions do better).
    if (
        stats is None
        and geo is not None
        and _per_line(geo)
        and (geo.elementwise.lines >= launcher.sm_count or not plan.folds)
    ):
        dx = np.empty_like(xv)
        dweight, dbias = launcher.backward_lines(
            xv, dyv, dx, geo.elementwise, geo.train_map, weight, eps, dtype, plan.center, lines
        )
        return dx, dweight.reshape(plan.param_shape), dbias.reshape(plan.param_shape)
    return fused.backward(xv, dyv, plan, weight, eps, dtype, stats, launcher=launcher)


def _per_line(geo: fused.Geometry) -> bool:
    """Each line of the elementwise geometry is one statistic."""
    return geo.stats.A == 1 and geo.stats.K == geo.elementwise.K


def moments(xv: Array, plan: core.Plan, dtype: np.dtype) -> core.Moments:
    """As :func:`core.moments`: the batch statistics of ``xv`` alone (one pass)."""
    launcher = _launcher()
    geo = None if launcher is None else fused.geometry(plan, launcher.sm_count)
    if geo is None:
        return core.moments(xv, plan, dtype)
    mean, var = fused.batch_moments(launcher, geo, plan, _compute(xv, dtype), dtype)
    return core.Moments(None if mean is None else mean.reshape(plan.stat_shape), var.reshape(plan.stat_shape))


def grad_sums(
    xv: Array, dyv: Array, plan: core.Plan, dtype: np.dtype, stats: core.Moments | None = None
) -> tuple[core.Centered, core.GradSums]:
    """As :func:`core.grad_sums` (one pass over x and dy), for the folding kinds.

    The returned ``Centered`` holds x itself (``d``, never written) and the
    mean (``offset``): ``d - offset`` is x minus the mean, as the contract says.
    """
    launcher = _launcher()
    geo = None if launcher is None or not plan.folds else fused.geometry(plan, launcher.sm_count)
    if geo is None:
        return core.grad_sums(xv, dyv, plan, dtype, stats)
    xv = _compute(xv, dtype)
    mean, var, sum_dy, sum_dy_xmu = fused.cell_sums(launcher, geo, plan, xv, _compute(dyv, dtype), dtype)
    if stats is not None:  # about the given mean instead of the batch's own
        given = stats.mean.astype(dtype, copy=False).reshape(plan.stat_shape)
        sum_dy_xmu = sum_dy_xmu + (mean - given) * sum_dy
        mean, var = given, stats.var.astype(dtype, copy=False).reshape(plan.stat_shape)
    moments_ = core.Moments(mean, var)
    return core.Centered(xv, mean, moments_), core.GradSums(plan.count, moments_, sum_dy, sum_dy_xmu)


def grad_input(
    centered: core.Centered,
    dyv: Array,
    plan: core.Plan,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
    sums: core.GradSums,
    training: bool,
    out: Array | None = None,
) -> tuple[Array, Array, Array]:
    """As :func:`core.grad_input` (one elementwise pass), except that ``centered.d`` is never written."""
    launcher = _launcher()
    geo = None if launcher is None or not plan.folds else fused.geometry(plan, launcher.sm_count)
    if geo is None:
        return core.grad_input(centered, dyv, plan, weight, eps, dtype, sums, training, out)
    var = sums.moments.var.astype(dtype, copy=False).reshape(plan.stat_shape)
    sum_dy, sum_dy_xmu = (np.asarray(a, dtype=dtype) for a in (sums.sum_dy, sums.sum_dy_xmu))
    c1, c2, dweight, dbias = fused.grad_coefficients(plan, var, sum_dy, sum_dy_xmu, weight, eps, sums.count)
    d = _compute(centered.d, dtype)
    dx = np.empty_like(d) if out is None else out
    launcher.grad_input(
        d,
        _compute(dyv, dtype),
        dx,
        geo.elementwise,
        geo.train_map,
        mean=np.broadcast_to(np.asarray(centered.offset, dtype=dtype), plan.stat_shape) if plan.center else None,
        var=var,
        eps=eps,
        weight=weight,
        c1=c1 if training and plan.center else None,
        c2=c2 if training else None,
        dtype=dtype,
    )
    return dx, dweight, dbias
