"""Fused CUDA kernels behind the CuPy layers: geometry, launches, and the small per-statistic math.

Same entry points as :mod:`normkernels.core` (``forward_train``, ``forward_eval``,
``backward``) and the same results, computed with the kernels of
``normkernels/cuda/normalization.cu`` instead of generic CuPy array code:

* training forward: one pass for the statistics (a Welford state per thread,
  Chan merges), one elementwise pass for ``y``; the per-row kinds (instance,
  group, layer, RMS norm) with many rows do both in a single kernel;
* eval forward: one elementwise pass;
* backward: one reduction pass over ``x`` and ``dy`` (the moments of ``x`` and
  the co-moment of ``x`` and ``dy``, so the statistics need not be known in
  advance), one elementwise pass for ``dx``; layer and RMS norm add one pass
  for the per-column ``dweight`` and ``dbias``.

The geometry (:func:`geometry`) is plain Python and is tested on the CPU
against NumPy emulations of the kernels; the launches go through a
:class:`Launcher` so that the per-statistic math here is tested the same way.
Plans that do not fit the index map fall back to :mod:`normkernels.core`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from normkernels import core
from normkernels.backend import Array, _suffix_start, array_module, sum_to

#: Set NORMKERNELS_FUSED=0 to run CUDA layers on the generic CuPy code instead.
ENV_SWITCH = "NORMKERNELS_FUSED"

#: Fill every output with NaN before the kernels write it, so an element a kernel
#: misses shows up (tests and debugging; NORMKERNELS_POISON=1 sets it).
poison_outputs = os.environ.get("NORMKERNELS_POISON", "0") == "1"

#: Threads per block of the 1-D kernels (a multiple of 32).
THREADS = 256
#: Lines shorter than this run the elementwise kernels in flat mode, and
#: reductions over lines shorter than 32 use the column layout.
_FLAT_BELOW = 256
_COLUMNS_BELOW = 32
#: CUDA's limit on grid.y (and grid.z).
_GRID_Y_MAX = 65535


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class IndexMap:
    """Element (line, k) -> statistic ``(line // sdiv) % smod`` and parameter
    ``(line % pmod) * pmul + (k // pdiv if pdiv else 0)``: the kernels' IndexMap."""

    sdiv: int
    smod: int
    pmod: int
    pmul: int
    pdiv: int

    def stat(self, line: Any) -> Any:
        return (line // self.sdiv) % self.smod

    def param(self, line: Any, k: Any) -> Any:
        base = (line % self.pmod) * self.pmul
        return base if self.pdiv == 0 else base + k // self.pdiv

    @property
    def args(self) -> tuple[np.int64, ...]:
        return tuple(np.int64(v) for v in (self.sdiv, self.smod, self.pmod, self.pmul, self.pdiv))


@dataclass(frozen=True)
class Reduction:
    """Groups of ``x`` seen as (A, B, K): group b holds every (a, k) of lines ``a * B + b``.

    ``columns``: the 32 x 8 column layout (short lines), else one block per
    (split, group). ``splits`` blocks share a group, ``chunk`` elements (rows
    in the column layout) each.
    """

    A: int
    B: int
    K: int
    columns: bool
    splits: int
    chunk: int
    map: IndexMap

    @property
    def grid(self) -> tuple[int, int]:
        if self.columns:
            return (math.ceil(self.B * self.K / 32), self.splits)
        return (self.splits, min(self.B, _GRID_Y_MAX))

    @property
    def block(self) -> tuple[int, int]:
        return (32, 8) if self.columns else (THREADS, 1)

    @property
    def partials(self) -> int:
        """Partial states per field: [splits][B][K] in the column layout, [splits][B] otherwise."""
        return self.splits * self.B * (self.K if self.columns else 1)


@dataclass(frozen=True)
class Elementwise:
    """An elementwise pass over ``lines`` lines of ``K`` elements."""

    lines: int
    K: int
    flat: bool
    grid: tuple[int, int]
    block: int = THREADS


@dataclass(frozen=True)
class Geometry:
    """Every launch a plan needs (None where the plan does not fit the kernels)."""

    elementwise: Elementwise
    train_map: IndexMap  # statistics: the batch's own
    eval_map: IndexMap | None  # statistics: per parameter (running statistics); None for group norm
    stats: Reduction  # groups = statistics (forward; layer/RMS backward)
    cells: Reduction  # groups = joint cells of statistics and parameters (folding kinds' backward)
    params: Reduction  # groups = parameters (eval backward; layer/RMS dweight, dbias)
    per_line_forward: bool  # one block per line does the whole training forward


def _squeeze(view: tuple[int, ...], *shapes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Drop the axes of size 1 in ``view`` from it and from ``shapes``: they change no index."""
    keep = [i for i, n in enumerate(view) if n > 1]
    return tuple(tuple(s[i] for i in keep) for s in (view, *shapes))


def _kept_block(view: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """[lo, hi) of the axes ``shape`` keeps (equal to ``view``), when they are contiguous."""
    kept = [i for i, (n, s) in enumerate(zip(view, shape, strict=True)) if s == n]
    if any(s not in (1, n) for n, s in zip(view, shape, strict=True)):
        return None
    if not kept:
        return (0, 0)
    lo, hi = kept[0], kept[-1] + 1
    return (lo, hi) if kept == list(range(lo, hi)) else None


def index_map(
    view: tuple[int, ...], j: int, stat_shape: tuple[int, ...], param_shape: tuple[int, ...]
) -> IndexMap | None:
    """The IndexMap for lines over ``view[:j]`` (squeezed shapes), or None when it cannot express them.

    Statistics must be constant along a line; parameters must vary over one
    contiguous block of axes that ends at ``j`` (a per-line offset), starts
    at ``j`` (an offset ``k // pdiv`` within the line), or straddles it.
    """
    stat, param = _kept_block(view, stat_shape), _kept_block(view, param_shape)
    if stat is None or param is None or stat[1] > j:
        return None
    (slo, shi), (plo, phi) = stat, param
    if plo == phi:  # one parameter for everything
        pmod, pmul, pdiv = 1, 1, 0
    elif phi <= j:
        if phi != j:
            return None
        pmod, pmul, pdiv = math.prod(view[plo:j]), 1, 0
    else:
        if plo > j:
            return None
        pmod, pmul, pdiv = math.prod(view[plo:j]), math.prod(view[j:phi]), math.prod(view[phi:])
    return IndexMap(math.prod(view[shi:j]), math.prod(view[slo:shi]), pmod, pmul, pdiv)


def _reduction(
    view: tuple[int, ...],
    groups: tuple[int, ...],
    stat_shape: tuple[int, ...],
    param_shape: tuple[int, ...],
    sm_count: int,
) -> Reduction | None:
    block = _kept_block(view, groups)
    if block is None:
        return None
    lo, hi = block
    imap = index_map(view, hi, stat_shape, param_shape)
    if imap is None:
        return None
    A, B, K = math.prod(view[:lo]), math.prod(view[lo:hi]), math.prod(view[hi:])
    target = 4 * sm_count  # blocks to fill the device a few times over
    columns = K < _COLUMNS_BELOW and B * K >= 32
    if columns:
        across = math.ceil(B * K / 32)
        splits = max(1, min(math.ceil(target / across), math.ceil(A / 128), _GRID_Y_MAX))
        chunk = math.ceil(A / splits)
    else:
        splits = max(1, min(math.ceil(target / B), math.ceil(A * K / (THREADS * 16))))
        chunk = math.ceil(A * K / splits)
    splits = math.ceil((A if columns else A * K) / chunk)  # no empty split
    return Reduction(A, B, K, columns, splits, chunk, imap)


@functools.lru_cache(maxsize=256)
def geometry(plan: core.Plan, sm_count: int) -> Geometry | None:
    """Launch geometry of ``plan`` on a device with ``sm_count`` multiprocessors."""
    view, stat, param, joint = _squeeze(plan.view, plan.stat_shape, plan.param_shape, plan.joint_shape)
    j = _suffix_start(view, stat)
    train_map = index_map(view, j, stat, param)
    eval_map = index_map(view, j, param, param)
    stats = _reduction(view, stat, stat, param, sm_count)
    cells = _reduction(view, joint, stat, param, sm_count)
    params = _reduction(view, param, stat, param, sm_count)
    if None in (train_map, stats, cells, params):
        return None
    lines, K = math.prod(view[:j]), math.prod(view[j:])
    flat = K < _FLAT_BELOW
    if flat:
        grid = (max(1, min(math.ceil(lines * K / THREADS), 32 * sm_count)), 1)
    else:
        grid = (max(1, min(math.ceil(K / THREADS), math.ceil(8 * sm_count / lines))), min(lines, _GRID_Y_MAX))
    per_line = stats.A == 1 and stats.K == K and (lines >= 2 * sm_count or K <= 4096)
    return Geometry(Elementwise(lines, K, flat, grid), train_map, eval_map, stats, cells, params, per_line)


# --------------------------------------------------------------------------- launches
class Launcher(Protocol):
    """The kernels, as the math below calls them (CUDA here; NumPy emulations in the tests)."""

    sm_count: int

    def reduce(self, op: str, plan: Reduction, x: Array, dy: Array | None = None, **operands: Any) -> Array:
        """Reduce and merge: ``op`` in moments, comoments, comoments_weighted, grad_sums -> [outputs][B]."""

    def normalize(self, x: Array, y: Array, ew: Elementwise, imap: IndexMap, **operands: Any) -> None: ...

    def grad_input(self, x: Array, dy: Array, dx: Array, ew: Elementwise, imap: IndexMap, **operands: Any) -> None: ...

    def forward_lines(self, x: Array, y: Array, ew: Elementwise, imap: IndexMap, **operands: Any) -> None: ...


#: Output rows of each reduction after the merge.
OUTPUTS = {"moments": 2, "comoments": 4, "comoments_weighted": 4, "grad_sums": 2}
#: Fields of each reduction's partial state.
FIELDS = {"moments": 3, "comoments": 5, "comoments_weighted": 5, "grad_sums": 2}


def _storage_code(dtype: np.dtype) -> str:
    # bfloat16 lives on the device as its uint16 bit pattern (CuPy has no bfloat16 dtype).
    return {"float16": "f16", "uint16": "bf16", "float32": "f32", "float64": "f64"}[np.dtype(dtype).name]


def _acc_code(dtype: np.dtype) -> str:
    return {"float32": "f32", "float64": "f64"}[np.dtype(dtype).name]


class CudaLauncher:
    """Launches the kernels of one device through a :class:`cupy.RawModule` on the current stream."""

    def __init__(self, device_id: int) -> None:
        import cupy

        from normkernels import cuda

        self._cupy = cupy
        self.device_id = device_id
        with cupy.cuda.Device(device_id):
            self.sm_count = int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])
        self._module = cuda.module()
        self._functions: dict[str, Any] = {}

    def _function(self, name: str) -> Any:
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module.get_function(name)
        return fn

    def _kernel(self, name: str, x: Array, acc: np.dtype) -> Any:
        """The kernel ``nk_<name>_<storage>_<accumulator>`` for ``x`` and the compute dtype ``acc``."""
        return self._function(f"nk_{name}_{_storage_code(x.dtype)}_{_acc_code(acc)}")

    @staticmethod
    def _ptr(a: Array | None) -> Any:
        return np.uint64(0) if a is None else a  # None would not be a null pointer (cupy#9046)

    def reduce(self, op: str, plan: Reduction, x: Array, dy: Array | None = None, **operands: Any) -> Array:
        cp = self._cupy
        acc = operands["dtype"]
        partial = cp.empty((FIELDS[op], plan.partials), dtype=acc)
        layout = "cols" if plan.columns else "rows"
        self._kernel(f"reduce_{layout}_{op}", x, acc)(
            plan.grid,
            plan.block,
            (
                x,
                self._ptr(dy),
                self._ptr(operands.get("mean")),
                self._ptr(operands.get("var")),
                self._ptr(operands.get("weight")),
                np.float64(operands.get("eps", 0.0)),
                np.int64(plan.A),
                np.int64(plan.B),
                np.int64(plan.K),
                np.int64(plan.chunk),
                *plan.map.args,
                partial,
            ),
        )
        out = cp.empty((OUTPUTS[op], plan.B), dtype=acc)
        kp = plan.K if plan.columns else 1
        # The weighted co-moments merge like the plain ones.
        self._function(f"nk_merge_{op.removesuffix('_weighted')}_{_acc_code(acc)}")(
            (max(1, min(math.ceil(plan.B / THREADS), 32 * self.sm_count)),),
            (THREADS,),
            (partial, np.int64(plan.splits), np.int64(plan.B), np.int64(kp), out),
        )
        return out

    def _elementwise(self, kernel: Any, ew: Elementwise, arrays: tuple, imap: IndexMap, tail: tuple) -> None:
        kernel(ew.grid, (ew.block,), (*arrays, np.int64(ew.lines), np.int64(ew.K), *imap.args, *tail))

    def normalize(self, x: Array, y: Array, ew: Elementwise, imap: IndexMap, **o: Any) -> None:
        p = self._ptr
        arrays = (x, y, p(o.get("mean")), o["var"], np.float64(o["eps"]), p(o.get("weight")), p(o.get("bias")))
        self._elementwise(self._kernel("normalize", x, o["dtype"]), ew, arrays, imap, (np.int32(ew.flat),))

    def grad_input(self, x: Array, dy: Array, dx: Array, ew: Elementwise, imap: IndexMap, **o: Any) -> None:
        p = self._ptr
        arrays = (x, dy, dx, p(o.get("mean")), o["var"], np.float64(o["eps"]), p(o.get("weight")))
        arrays += (p(o.get("c1")), p(o.get("c2")))
        self._elementwise(self._kernel("grad_input", x, o["dtype"]), ew, arrays, imap, (np.int32(ew.flat),))

    def forward_lines(self, x: Array, y: Array, ew: Elementwise, imap: IndexMap, **o: Any) -> None:
        p = self._ptr
        threads = 128 if ew.K <= 1024 else (256 if ew.K <= 8192 else 512)
        self._kernel("forward_lines", x, o["dtype"])(
            (max(1, min(ew.lines, 32 * self.sm_count)),),
            (threads,),
            (
                x,
                y,
                p(o.get("weight")),
                p(o.get("bias")),
                np.float64(o["eps"]),
                np.int64(ew.lines),
                np.int64(ew.K),
                *imap.args,
                np.int32(o["center"]),
                o["mean_out"],
                o["var_out"],
            ),
        )


@functools.lru_cache(maxsize=16)
def cuda_launcher(device_id: int) -> CudaLauncher:
    return CudaLauncher(device_id)


def enabled() -> bool:
    """Whether CUDA layers use the fused kernels (NORMKERNELS_FUSED=0 turns them off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _launcher(x: Array) -> CudaLauncher:
    return cuda_launcher(int(x.device.id))


def _output(like: Array) -> Array:
    out = array_module(like).empty_like(like)
    if poison_outputs:
        out.fill(0x7FC0 if out.dtype == np.uint16 else np.nan)  # uint16: a bfloat16 NaN
    return out


def _values(a: Array, dtype: np.dtype) -> Array:
    """What core computes on: bfloat16 bit patterns (uint16) as their values, exactly; other dtypes as they are."""
    if a.dtype != np.uint16:
        return a
    xp = array_module(a)
    return (a.astype(xp.uint32) << 16).view(xp.float32).astype(dtype, copy=False)


def _stored(values: Array, like: Array) -> Array:
    """``values`` in ``like``'s storage dtype, as the kernels write them (bfloat16: round to nearest even)."""
    if like.dtype != np.uint16:
        return values.astype(like.dtype, copy=False)
    xp = array_module(values)
    bits = values.astype(xp.float32).view(xp.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(xp.uint16)
    return xp.where(xp.isnan(values), xp.uint16(0x7FC0), rounded)


def _flat(a: Array | None, dtype: np.dtype) -> Array | None:
    return None if a is None else array_module(a).ascontiguousarray(a.astype(dtype, copy=False).reshape(-1))


# --------------------------------------------------------------------------- the math
def forward_train(
    xv: Array,
    plan: core.Plan,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: np.dtype,
    launcher: Launcher | None = None,
) -> tuple[Array, core.Moments]:
    """As :func:`core.forward_train`, but ``y`` comes in ``xv``'s dtype (written once, by the kernel)."""
    launcher = launcher or _launcher(xv)
    geo = geometry(plan, launcher.sm_count)
    if geo is None:  # core, on the values (not bfloat16's bit patterns), y stored as the kernels would
        y, stats = core.forward_train(_values(xv, dtype), plan, weight, bias, eps, dtype)
        return _stored(y, xv), stats
    xp = array_module(xv)
    xv = xp.ascontiguousarray(xv)
    y = _output(xv)
    w, b = _flat(weight, dtype), _flat(bias, dtype)
    if geo.per_line_forward:
        mean = xp.empty(geo.elementwise.lines, dtype=dtype)
        var = xp.empty(geo.elementwise.lines, dtype=dtype)
        launcher.forward_lines(
            xv,
            y,
            geo.elementwise,
            geo.train_map,
            weight=w,
            bias=b,
            eps=eps,
            dtype=dtype,
            center=plan.center,
            mean_out=mean,
            var_out=var,
        )
    else:
        mean, var = batch_moments(launcher, geo, plan, xv, dtype)
        launcher.normalize(
            xv,
            y,
            geo.elementwise,
            geo.train_map,
            mean=mean,
            var=var,
            eps=eps,
            weight=w,
            bias=b,
            dtype=dtype,
        )
    mean = mean.reshape(plan.stat_shape) if plan.center else None
    return y, core.Moments(mean, var.reshape(plan.stat_shape))


def forward_eval(
    xv: Array,
    plan: core.Plan,
    stats: core.Moments,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: np.dtype,
    launcher: Launcher | None = None,
) -> Array:
    """As :func:`core.forward_eval` (one elementwise pass), ``y`` in ``xv``'s dtype."""
    launcher = launcher or _launcher(xv)
    geo = geometry(plan, launcher.sm_count)
    if geo is None or geo.eval_map is None:
        return _stored(core.forward_eval(_values(xv, dtype), plan, stats, weight, bias, eps, dtype), xv)
    xp = array_module(xv)
    xv = xp.ascontiguousarray(xv)
    y = _output(xv)
    launcher.normalize(
        xv,
        y,
        geo.elementwise,
        geo.eval_map,
        mean=_flat(stats.mean, dtype),
        var=_flat(stats.var, dtype),
        eps=eps,
        weight=_flat(weight, dtype),
        bias=_flat(bias, dtype),
        dtype=dtype,
    )
    return y


def backward(
    xv: Array,
    dyv: Array,
    plan: core.Plan,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
    stats: core.Moments | None = None,
    launcher: Launcher | None = None,
) -> tuple[Array, Array, Array]:
    """As :func:`core.backward`: ``(dx, dweight, dbias)``, dx in ``xv``'s dtype, the rest in ``dtype``."""
    launcher = launcher or _launcher(xv)
    geo = geometry(plan, launcher.sm_count)
    if geo is None or xv.dtype != dyv.dtype or (stats is not None and geo.eval_map is None):
        dx, dweight, dbias = core.backward(_values(xv, dtype), _values(dyv, dtype), plan, weight, eps, dtype, stats)
        return _stored(dx, xv), dweight, dbias
    xp = array_module(xv)
    xv, dyv = xp.ascontiguousarray(xv), xp.ascontiguousarray(dyv)
    w = _flat(weight, dtype)
    dx = _output(xv)
    if stats is not None:
        dweight, dbias = _constant_stats_param_grads(launcher, geo, plan, xv, dyv, stats, eps, dtype)
        mean, var = _flat(stats.mean, dtype), _flat(stats.var, dtype)
        launcher.grad_input(
            xv, dyv, dx, geo.elementwise, geo.eval_map, mean=mean, var=var, eps=eps, weight=w, dtype=dtype
        )
        return dx, dweight, dbias
    if plan.folds:
        mean, var, c1, c2, dweight, dbias = _folded_coefficients(launcher, geo, plan, xv, dyv, weight, eps, dtype)
    else:
        mean, var, c1, c2 = _row_coefficients(launcher, geo, plan, xv, dyv, w, eps, dtype)
        dbias, dweight = launcher.reduce(
            "grad_sums", geo.params, xv, dyv, mean=mean, var=var, eps=eps, dtype=dtype
        ).reshape(2, *plan.param_shape)
    launcher.grad_input(
        xv,
        dyv,
        dx,
        geo.elementwise,
        geo.train_map,
        mean=mean,
        var=var,
        eps=eps,
        weight=w,
        c1=c1,
        c2=c2,
        dtype=dtype,
    )
    return dx, dweight, dbias


def batch_moments(
    launcher: Launcher, geo: Geometry, plan: core.Plan, xv: Array, dtype: np.dtype
) -> tuple[Array | None, Array]:
    """One reduction pass: per statistic (flat) the mean and the variance; RMS norm: None and the mean square."""
    mean, var = launcher.reduce("moments", geo.stats, xv, dtype=dtype)
    if not plan.center:
        return None, var + mean * mean
    return mean, var


def cell_sums(
    launcher: Launcher, geo: Geometry, plan: core.Plan, xv: Array, dyv: Array, dtype: np.dtype
) -> tuple[Array, Array, Array, Array]:
    """One pass over x and dy for the folding kinds (batch, instance, group norm).

    Returns the mean and variance per statistic (``plan.stat_shape``), and per
    cell of ``plan.joint_shape`` (constant in both statistic and parameter,
    a channel of one group, say; every cell of a statistic holds the same
    count) sum(dy) and sum(dy * (x - mean)).
    """
    joint, stat = plan.joint_shape, plan.stat_shape
    mean_c, var_c, sum_dy, co = launcher.reduce("comoments", geo.cells, xv, dyv, dtype=dtype).reshape(4, *joint)
    per_stat = math.prod(joint) // math.prod(stat)
    mean = sum_to(mean_c, stat) / per_stat
    var = sum_to(var_c + (mean_c - mean) ** 2, stat) / per_stat if per_stat > 1 else var_c
    # sum(dy * (x - mean)) over a cell, from its own co-moment about the cell's mean.
    return mean, var, sum_dy, co + (mean_c - mean) * sum_dy


def grad_coefficients(
    plan: core.Plan, var: Array, sum_dy: Array, sum_dy_xmu: Array, weight: Array | None, eps: float, count: int
) -> tuple[Array, Array, Array, Array]:
    """The grad_input kernel's c1, c2 (flat, per statistic), dweight and dbias (``plan.param_shape``).

    From the statistics' variance and the per-cell sums of :func:`cell_sums`;
    ``count`` elements stand behind each statistic.
    """
    stat = plan.stat_shape
    sum_dy_xhat = core.rstd(var, eps) * sum_dy_xmu
    weighted = (lambda a: a) if weight is None else (lambda a: a * weight)
    c1 = sum_to(weighted(sum_dy), stat) / count
    c2 = sum_to(weighted(sum_dy_xhat), stat) / count
    return c1.reshape(-1), c2.reshape(-1), sum_to(sum_dy_xhat, plan.param_shape), sum_to(sum_dy, plan.param_shape)


def _folded_coefficients(
    launcher: Launcher,
    geo: Geometry,
    plan: core.Plan,
    xv: Array,
    dyv: Array,
    weight: Array | None,
    eps: float,
    dtype: np.dtype,
) -> tuple[Array, ...]:
    """Batch, instance and group norm: one pass gives per-cell moments and co-moments, the rest is per cell."""
    mean, var, sum_dy, sum_dy_xmu = cell_sums(launcher, geo, plan, xv, dyv, dtype)
    c1, c2, dweight, dbias = grad_coefficients(plan, var, sum_dy, sum_dy_xmu, weight, eps, plan.count)
    return mean.reshape(-1), var.reshape(-1), c1, c2, dweight, dbias


def _row_coefficients(
    launcher: Launcher,
    geo: Geometry,
    plan: core.Plan,
    xv: Array,
    dyv: Array,
    w: Array | None,
    eps: float,
    dtype: np.dtype,
) -> tuple[Array | None, Array, Array | None, Array]:
    """Layer and RMS norm: one pass per row gives its moments and the co-moment of x and g = dy * weight."""
    op = "comoments" if w is None else "comoments_weighted"
    mean, var, sum_g, co = launcher.reduce(op, geo.stats, xv, dyv, weight=w, dtype=dtype)
    n = plan.count
    if not plan.center:  # about 0, not the mean: mean square, and sum(g * x)
        var, co = var + mean * mean, co + mean * sum_g
        return None, var, None, core.rstd(var, eps) * co / n
    return mean, var, sum_g / n, core.rstd(var, eps) * co / n


def _constant_stats_param_grads(
    launcher: Launcher,
    geo: Geometry,
    plan: core.Plan,
    xv: Array,
    dyv: Array,
    stats: core.Moments,
    eps: float,
    dtype: np.dtype,
) -> tuple[Array, Array]:
    """dweight and dbias with given (running) statistics: per-parameter moments and co-moments of x and dy."""
    shape = plan.param_shape
    mean_c, _, sum_dy, co = launcher.reduce("comoments", geo.params, xv, dyv, dtype=dtype).reshape(4, *shape)
    running_mean = 0.0 if stats.mean is None else stats.mean.astype(dtype, copy=False).reshape(shape)
    rstd = core.rstd(stats.var.astype(dtype, copy=False).reshape(shape), eps)
    return rstd * (co + (mean_c - running_mean) * sum_dy), sum_dy


# Synchronized batch norm's passes (the layer takes them from its math module) run on the generic code.
moments = core.moments
grad_sums = core.grad_sums
grad_input = core.grad_input
