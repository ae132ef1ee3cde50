"""The numba kernels of the compiled CPU path (driven by :mod:`normkernels.compiled`).

They implement the contract of ``normkernels/cuda/normalization.cu`` on the
CPU: ``x`` is ``lines`` contiguous lines of ``K`` elements, and element
(line, k) belongs to statistic ``(line // sdiv) % smod`` and parameter
``(line % pmod) * pmul + (k // pdiv if pdiv else 0)`` (a
:class:`normkernels.fused.IndexMap`). One set of kernels serves every kind
whose statistics are constant along a line; statistics over the channels at
each pixel (LayerNorm2d: x as (A, C, S), a statistic per (a, s)) have kernels
of their own, ``forward_pixels`` and ``backward_pixels``, which take the
pixels as the vector dimension.

Importing it configures numba first (:func:`normkernels.compiled.configure_numba`:
threading layer, cache folder). Nothing compiles at import:
:func:`normkernels.compiled.warm_up` compiles (or loads from the cache) the
signatures in :data:`SIGNATURES`, then turns compilation off, so a call can
never compile.

Numerics: every kernel computes in the dtype of its arrays (float32 or
float64; the caller converts float16). Statistics use a two-pass in cache:
``SEGMENT`` elements are summed, then their deviations from that mean are
summed and squared (the deviations' sum corrects the mean and the M2), and
segments merge with Chan's formula in float64. ``fastmath`` is limited to
``reassoc`` (vectorized sums) and ``contract`` (FMA): NaN and Inf propagate
as IEEE says, which the non-finite checks rely on.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from normkernels import compiled

compiled.configure_numba()  # cache folder and threading layer, before the first kernel is defined

__all__ = ["FASTMATH", "KERNELS", "SEGMENT", "SIGNATURES"]

#: LLVM fast-math flags: reassociation (vectorized reductions) and FMA only; no nnan/ninf/nsz/arcp.
FASTMATH = frozenset({"reassoc", "contract"})
#: Elements of one line summed in one two-pass (16 KiB of float64: both passes hit L1).
SEGMENT = 2048
#: float32 lines up to this long get their moments in one pass in float64 (:func:`_short_moments`).
SHORT_LINE = 256
#: Elements per block of lines in the per-line kinds' fused passes: the block stays in L2 between
#: its statistics and its outputs (a line longer than this is a block of its own).
BLOCK = 16384

# error_model="numpy": a division by zero gives Inf/NaN, as NumPy does, instead of raising.
_OPTIONS = {"nogil": True, "fastmath": set(FASTMATH), "cache": True, "error_model": "numpy", "boundscheck": False}
# Three layers, for speed that was measured, not guessed:
# * kernels (parallel) only split the work: numba outlines a prange body into a function that reads
#   its arrays through pointers, and loops written there do not vectorize (5-30x slower);
# * each range of work is a serial function, where the loops vectorize;
# * helpers are inlined into those in numba's IR: a call per line to a compiled helper costs 10x.
_helper = numba.njit(inline="always", **_OPTIONS)
_serial = numba.njit(**_OPTIONS)
_kernel = numba.njit(parallel=True, **_OPTIONS)


# --------------------------------------------------------------------------- typed scalars
def _zero_of(a: np.ndarray):  # pragma: no cover - replaced by the overload inside kernels
    return a.dtype.type(0)


@overload(_zero_of, inline="always")
def _zero_of_impl(a):
    dtype = a.dtype

    def impl(a):
        return dtype(0)

    return impl


def _single(a):  # pragma: no cover - replaced by the overload inside kernels
    return a.dtype == np.float32


@overload(_single, inline="always")
def _single_impl(a):
    # A constant of the compiled signature: the branches it guards are compiled out of the others.
    single = a.dtype == types.float32

    def impl(a):
        return single

    return impl


def _as(like, value):  # pragma: no cover - replaced by the overload inside kernels
    return type(like)(value)


@overload(_as, inline="always")
def _as_impl(like, value):
    # Integer counts and float64 scalars in the kernels' dtype: float32 / int64 would promote to float64.
    kind = like

    def impl(like, value):
        return kind(value)

    return impl


# --------------------------------------------------------------------------- statistics helpers
# Helpers take views of one line (``x[lo:hi]``), never an array and an offset: numba wraps negative
# indices, and with ``x[lo + k]`` it cannot tell the sign of lo, so every load became a gather (13x slower).
@_helper
def _segment(x):
    """Mean (float64) and M2 of ``x`` by a corrected two-pass (short enough to stay in cache).

    The mean is the first pass's plus the correction, added in float64: rounded to the data's
    dtype it would lose the bits that ill-conditioned groups (two close values) need.
    """
    z = _zero_of(x)
    n = _as(z, x.size)
    s = z
    for i in range(x.size):
        s += x[i]
    m = s / n
    c = z
    q = z
    for i in range(x.size):
        d = x[i] - m
        c += d
        q += d * d
    m2 = q - c * c / n
    if m2 < z:  # written so that NaN passes (max() would drop it)
        m2 = z
    return np.float64(m) + np.float64(c / n), m2


@_helper
def _segment_co(x, g):
    """As :func:`_segment`, plus sum(g) and the co-moment sum((x - mean) * g) (a third pass, still in cache)."""
    mean, m2 = _segment(x)
    m0, off = _split(x, mean)
    sg = _zero_of(x)
    co = _zero_of(x)
    for i in range(x.size):
        sg += g[i]
        co += (x[i] - m0) * g[i]
    return mean, m2, sg, co - off * sg


@_helper
def _merge(n, mean, m2, sg, co, nb, mb, m2b, sgb, cob):
    """Chan et al.: the state of two disjoint sets (float64). ``co`` is sum((x - mean) * g) about the set's mean."""
    if nb == 0:
        return n, mean, m2, sg, co
    if n == 0:
        return nb, mb, m2b, sgb, cob
    total = n + nb
    f = nb / total
    delta = mb - mean
    new = mean + delta * f
    m2 = m2 + m2b + delta * delta * n * f
    co = co + cob + (mean - new) * sg + (mb - new) * sgb
    return total, new, m2, sg + sgb, co


@_helper
def _line_moments(x):
    """Mean and M2 (float64) of one line, a segment at a time."""
    K = x.size
    if K <= SEGMENT:
        m, m2 = _segment(x)
        return m, np.float64(m2)
    n = 0
    mean = 0.0
    m2 = 0.0
    for s0 in range(0, K, SEGMENT):
        s1 = min(s0 + SEGMENT, K)
        mb, m2b = _segment(x[s0:s1])
        n, mean, m2, _, _ = _merge(n, mean, m2, 0.0, 0.0, s1 - s0, mb, np.float64(m2b), 0.0, 0.0)
    return mean, m2


@_helper
def _short_moments(x):
    """Mean and M2 (float64) of a short float32 line in one pass: sums of x - x[0] in float64.

    Two passes over a short line cost more in their per-line work (three horizontal sums, the
    dependent second pass) than in the loops. Shifting by a value of the line bounds the
    cancellation: (x[0] - mean)^2 <= n * var, so M2 = sum(d^2) - sum(d)^2 / n loses at most
    log2(n + 1) of float64's 53 bits, and keeps float32's 24.
    """
    x0 = np.float64(x[0])
    s = 0.0
    q = 0.0
    for i in range(x.size):
        d = np.float64(x[i]) - x0
        s += d
        q += d * d
    m2 = q - s * s / x.size
    if m2 < 0.0:  # written so that NaN passes
        m2 = 0.0
    return x0 + s / x.size, m2


@_helper
def _mean_square(x):
    """sum(x * x) / n (float64), a segment at a time: no cancellation to fear, and Inf stays Inf."""
    total = 0.0
    for s0 in range(0, x.size, SEGMENT):
        xs = x[s0 : min(s0 + SEGMENT, x.size)]
        q = _zero_of(x)
        for i in range(xs.size):
            q += xs[i] * xs[i]
        total += np.float64(q)
    return total / x.size


@_helper
def _split(x, mean):
    """A float64 mean as m0 + off in the data's dtype: m0 its rounding, off the rest (for x - m0 - off)."""
    m0 = _as(_zero_of(x), mean)
    return m0, _as(m0, mean - np.float64(m0))


@_helper
def _line_stats(x, center, eps):
    """A line's mean as m0 + off (0 without centering), variance (mean square without centering), rstd."""
    z = _zero_of(x)
    if center:
        mean, m2 = _short_moments(x) if _single(x) and x.size <= SHORT_LINE else _line_moments(x)
        var = m2 / x.size
    else:
        mean, var = 0.0, _mean_square(x)
    v = _as(z, var)
    m0, off = _split(x, mean)
    return m0, off, v, _as(z, 1) / np.sqrt(v + eps)


# --------------------------------------------------------------------------- the index map, by counting
# A line's statistic (line // sdiv) % smod and parameter line % pmod advance by counting along a range,
# not by dividing per line: a 64-bit division takes tens of cycles on many CPUs, as long as a short
# line's whole loop (batch norm of 1x512x7x7, eval: 32 us a call -> 13 on an Intel Xeon).
@_helper
def _count(r, div):
    """``(r + 1) % div`` for ``0 <= r < div``, and whether it wrapped (1) or not (0)."""
    r += 1
    if r == div:
        return 0, 1
    return r, 0


@_helper
def _next_index(r, q, div, mod):
    """From line l's ``(l % div, (l // div) % mod)`` to line l + 1's."""
    r, wrapped = _count(r, div)
    if wrapped:
        q, _ = _count(q, mod)
    return r, q


# --------------------------------------------------------------------------- elementwise helpers
# Parameters along a line (w, b: views from the line's first parameter): one for the whole line
# (pdiv == 0), one per element (pdiv == 1, layer norm), or one per run of pdiv elements (group norm's
# channels). Each case is its own inner loop, so that the loop the compiler vectorizes has no division.
@_helper
def _normalize_line(x, y, m, r, pdiv, w, b):
    """``y = (x - m) * r * w[p] + b[p]`` along one line."""
    if pdiv == 0:
        a = r * w[0]
        c = b[0]
        for i in range(x.size):
            y[i] = (x[i] - m) * a + c
    elif pdiv == 1:
        for k in range(x.size):
            y[k] = (x[k] - m) * (r * w[k]) + b[k]
    else:
        for q in range(x.size // pdiv):
            a = r * w[q]
            c = b[q]
            xs = x[q * pdiv : (q + 1) * pdiv]
            ys = y[q * pdiv : (q + 1) * pdiv]
            for i in range(pdiv):
                ys[i] = (xs[i] - m) * a + c


@_helper
def _scale_line(dy, dx, r, pdiv, w):
    """``dx = dy * r * w[p]``: the gradient through constant statistics."""
    if pdiv == 0:
        a = r * w[0]
        for i in range(dy.size):
            dx[i] = dy[i] * a
    elif pdiv == 1:
        for k in range(dy.size):
            dx[k] = dy[k] * (r * w[k])
    else:
        for q in range(dy.size // pdiv):
            a = r * w[q]
            dys = dy[q * pdiv : (q + 1) * pdiv]
            dxs = dx[q * pdiv : (q + 1) * pdiv]
            for i in range(pdiv):
                dxs[i] = dys[i] * a


@_helper
def _grad_line(x, dy, dx, m, r, q, c, pdiv, w):
    """``dx = dy * r * w[p] + (x - m) * q + c``: the gradient through the line's own statistics."""
    if pdiv == 0:
        a = r * w[0]
        for i in range(x.size):
            dx[i] = dy[i] * a + (x[i] - m) * q + c
    elif pdiv == 1:
        for k in range(x.size):
            dx[k] = dy[k] * (r * w[k]) + (x[k] - m) * q + c
    else:
        for j in range(x.size // pdiv):
            a = r * w[j]
            xs = x[j * pdiv : (j + 1) * pdiv]
            dys = dy[j * pdiv : (j + 1) * pdiv]
            dxs = dx[j * pdiv : (j + 1) * pdiv]
            for i in range(pdiv):
                dxs[i] = dys[i] * a + (xs[i] - m) * q + c


@_helper
def _line_grad_sums(x, dy, m, off, r, pdiv, w, dw, db):
    """sum(g) and sum(g * (x - mean)) of one line (g = dy * w[p], mean = m + off); adds its dweight and
    dbias terms to dw, db. x - m is exact for x near the mean; off then comes off without rounding m."""
    z = _zero_of(x)
    sg = z
    sgx = z
    if pdiv == 1:
        for k in range(x.size):
            d = dy[k]
            xm = (x[k] - m) - off
            dw[k] += d * xm * r
            db[k] += d
            g = d * w[k]
            sg += g
            sgx += g * xm
        return sg, sgx
    run = x.size if pdiv == 0 else pdiv
    for j in range(x.size // run):
        xs = x[j * run : (j + 1) * run]
        dys = dy[j * run : (j + 1) * run]
        sdy = z
        sdyx = z
        for i in range(run):
            sdy += dys[i]
            sdyx += dys[i] * ((xs[i] - m) - off)
        dw[j] += sdyx * r
        db[j] += sdy
        sg += w[j] * sdy
        sgx += w[j] * sdyx
    return sg, sgx


@_helper
def _spread_stats(P, K, sdiv, smod, values):
    """``out[l * K + k] = values[s(l)]`` over the P lines of one period of the map."""
    out = np.empty(P * K, dtype=values.dtype)
    sr, s = 0, 0
    for line in range(P):
        v = values[s]
        for k in range(K):
            out[line * K + k] = v
        sr, s = _next_index(sr, s, sdiv, smod)
    return out


@_helper
def _spread_params(P, K, pmod, pmul, pdiv, values):
    """``out[l * K + k] = values[p(l, k)]`` over the P lines of one period of the map."""
    out = np.empty(P * K, dtype=values.dtype)
    for line in range(P):
        base = (line % pmod) * pmul
        if pdiv == 0:
            for k in range(K):
                out[line * K + k] = values[base]
        else:
            run, q = 0, 0
            for k in range(K):
                out[line * K + k] = values[base + q]
                run, wrapped = _count(run, pdiv)
                q += wrapped
    return out


@_helper
def _spread_scale(P, K, sdiv, smod, pmod, pmul, pdiv, rstd, w):
    """``rstd[s] * w[p]`` per element of one period."""
    out = _spread_stats(P, K, sdiv, smod, rstd)
    ws = _spread_params(P, K, pmod, pmul, pdiv, w)
    for j in range(P * K):
        out[j] *= ws[j]
    return out


@_helper
def _rstd(var, eps):
    out = np.empty_like(var)
    one = _as(_zero_of(var), 1)
    for i in range(var.size):
        out[i] = one / np.sqrt(var[i] + eps)
    return out


@_helper
def _grad_coefficients(rstd, c1, c2):
    """Per statistic, the factor of (x - mean) and the constant of dx: -rstd^2 * c2 and -rstd * c1."""
    q = np.empty_like(rstd)
    cst = np.empty_like(rstd)
    for s in range(rstd.size):
        q[s] = -rstd[s] * rstd[s] * c2[s]
        cst[s] = -rstd[s] * c1[s]
    return q, cst


@_helper
def _tile(x, g, has_g, rows, width, stride, parts):
    """Per column of a tile (``rows`` rows of ``width`` columns, ``stride`` apart, from x[0]): ``parts[j]``.

    The per-column loops run along contiguous memory (vectorized); the tile stays in cache for its second pass.
    """
    z = _zero_of(x)
    n = _as(z, rows)
    sx = np.zeros(width, dtype=x.dtype)
    sg = np.zeros(width, dtype=x.dtype)
    for r in range(rows):
        xr = x[r * stride : r * stride + width]
        for j in range(width):
            sx[j] += xr[j]
        if has_g:
            gr = g[r * stride : r * stride + width]
            for j in range(width):
                sg[j] += gr[j]
    m = np.empty(width, dtype=x.dtype)
    for j in range(width):
        m[j] = sx[j] / n
    cs = np.zeros(width, dtype=x.dtype)
    q = np.zeros(width, dtype=x.dtype)
    cg = np.zeros(width, dtype=x.dtype)
    for r in range(rows):
        xr = x[r * stride : r * stride + width]
        for j in range(width):
            d = xr[j] - m[j]
            cs[j] += d
            q[j] += d * d
        if has_g:
            gr = g[r * stride : r * stride + width]
            for j in range(width):
                cg[j] += (xr[j] - m[j]) * gr[j]
    for j in range(width):
        m2 = q[j] - cs[j] * cs[j] / n
        if m2 < z:
            m2 = z
        parts[j, 0] = np.float64(m[j]) + np.float64(cs[j] / n)
        parts[j, 1] = m2
        parts[j, 2] = sg[j]
        parts[j, 3] = cg[j] - cs[j] / n * sg[j]


@_helper
def _non_finite(a):
    """How many elements of ``a`` are NaN or Inf."""
    count = 0
    for i in range(a.size):
        if not np.isfinite(a[i]):
            count += 1
    return count


# --------------------------------------------------------------------------- ranges of work
# The per-line kinds' fused ranges work a block of lines (BLOCK elements, in cache) at a time: the
# block's statistics, then its outputs, where they branch on pdiv once and pass it on as a constant.
# With a runtime pdiv, the branch inside every line's helpers costs 15 ns a line (3.4x on short
# lines); specializing only the output part keeps the compile time (each copy is compiled).
@_serial
def _normalize_lines(x, y, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, b):
    if pdiv == 0:
        _normalize_span(x, y, l0, l1, K, sdiv, smod, pmod, pmul, 0, mean, rstd, w, b)
    elif pdiv == 1:
        _normalize_span(x, y, l0, l1, K, sdiv, smod, pmod, pmul, 1, mean, rstd, w, b)
    else:
        _normalize_span(x, y, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, b)


@_helper
def _normalize_span(x, y, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, b):
    sr, s, p = l0 % sdiv, (l0 // sdiv) % smod, l0 % pmod
    for line in range(l0, l1):
        base = p * pmul
        lo = line * K
        _normalize_line(x[lo : lo + K], y[lo : lo + K], mean[s], rstd[s], pdiv, w[base:], b[base:])
        sr, s = _next_index(sr, s, sdiv, smod)
        p, _ = _count(p, pmod)


@_serial
def _normalize_rows(x, y, r0, r1, W, mm, aa, bb):
    for row in range(r0, r1):
        xr = x[row * W : (row + 1) * W]
        yr = y[row * W : (row + 1) * W]
        for j in range(W):
            yr[j] = (xr[j] - mm[j]) * aa[j] + bb[j]


@_serial
def _grad_lines(x, dy, dx, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, c1, c2, training):
    if pdiv == 0:
        _grad_span(x, dy, dx, l0, l1, K, sdiv, smod, pmod, pmul, 0, mean, rstd, w, c1, c2, training)
    elif pdiv == 1:
        _grad_span(x, dy, dx, l0, l1, K, sdiv, smod, pmod, pmul, 1, mean, rstd, w, c1, c2, training)
    else:
        _grad_span(x, dy, dx, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, c1, c2, training)


@_helper
def _grad_span(x, dy, dx, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, c1, c2, training):
    sr, s, p = l0 % sdiv, (l0 // sdiv) % smod, l0 % pmod
    for line in range(l0, l1):
        r = rstd[s]
        ws = w[p * pmul :]
        lo, hi = line * K, line * K + K
        if training:
            _grad_line(x[lo:hi], dy[lo:hi], dx[lo:hi], mean[s], r, -r * r * c2[s], -r * c1[s], pdiv, ws)
        else:
            _scale_line(dy[lo:hi], dx[lo:hi], r, pdiv, ws)
        sr, s = _next_index(sr, s, sdiv, smod)
        p, _ = _count(p, pmod)


@_serial
def _grad_rows(x, dy, dx, r0, r1, W, pp, mm, qq, cc, training):
    for row in range(r0, r1):
        xr = x[row * W : (row + 1) * W]
        dyr = dy[row * W : (row + 1) * W]
        dxr = dx[row * W : (row + 1) * W]
        if training:
            for j in range(W):
                dxr[j] = dyr[j] * pp[j] + (xr[j] - mm[j]) * qq[j] + cc[j]
        else:
            for j in range(W):
                dxr[j] = dyr[j] * pp[j]


@_serial
def _forward_lines(x, y, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, w, b, eps, center, mean_out, var_out):
    block = max(1, BLOCK // K)
    m = np.empty(block, dtype=x.dtype)
    r = np.empty(block, dtype=x.dtype)
    sr, s = l0 % sdiv, (l0 // sdiv) % smod
    for b0 in range(l0, l1, block):
        b1 = min(b0 + block, l1)
        for line in range(b0, b1):
            m[line - b0], _, v, r[line - b0] = _line_stats(x[line * K : line * K + K], center, eps)
            mean_out[s] = m[line - b0]
            var_out[s] = v
            sr, s = _next_index(sr, s, sdiv, smod)
        if pdiv == 0:
            _normalize_block(x, y, b0, b1, K, pmod, pmul, 0, m, r, w, b)
        elif pdiv == 1:
            _normalize_block(x, y, b0, b1, K, pmod, pmul, 1, m, r, w, b)
        else:
            _normalize_block(x, y, b0, b1, K, pmod, pmul, pdiv, m, r, w, b)


@_helper
def _normalize_block(x, y, b0, b1, K, pmod, pmul, pdiv, m, r, w, b):
    """Lines [b0, b1) with their mean and rstd in ``m[line - b0]``, ``r[line - b0]``."""
    p = b0 % pmod
    for line in range(b0, b1):
        base = p * pmul
        lo = line * K
        _normalize_line(x[lo : lo + K], y[lo : lo + K], m[line - b0], r[line - b0], pdiv, w[base:], b[base:])
        p, _ = _count(p, pmod)


@_serial
def _backward_lines(x, dy, dx, l0, l1, K, pmod, pmul, pdiv, w, eps, center, dw, db):
    block = max(1, BLOCK // K)
    m = np.empty(block, dtype=x.dtype)
    off = np.empty(block, dtype=x.dtype)
    r = np.empty(block, dtype=x.dtype)
    for b0 in range(l0, l1, block):
        b1 = min(b0 + block, l1)
        for line in range(b0, b1):
            m[line - b0], off[line - b0], _, r[line - b0] = _line_stats(x[line * K : line * K + K], center, eps)
        if pdiv == 0:
            _backward_block(x, dy, dx, b0, b1, K, pmod, pmul, 0, w, m, off, r, center, dw, db)
        elif pdiv == 1:
            _backward_block(x, dy, dx, b0, b1, K, pmod, pmul, 1, w, m, off, r, center, dw, db)
        else:
            _backward_block(x, dy, dx, b0, b1, K, pmod, pmul, pdiv, w, m, off, r, center, dw, db)


@_helper
def _backward_block(x, dy, dx, b0, b1, K, pmod, pmul, pdiv, w, m, off, r, center, dw, db):
    """Lines [b0, b1) with their mean (m + off) and rstd at ``[line - b0]``: sums, then dx."""
    n = K
    p = b0 % pmod
    for line in range(b0, b1):
        xs, dys, dxs = x[line * K : line * K + K], dy[line * K : line * K + K], dx[line * K : line * K + K]
        ml, ol, rl = m[line - b0], off[line - b0], r[line - b0]
        base = p * pmul
        p, _ = _count(p, pmod)
        sg, sgx = _line_grad_sums(xs, dys, ml, ol, rl, pdiv, w[base:], dw[base:], db[base:])
        if center and n == 1:  # one value per statistic: dx is 0 (NaN from NaN or Inf), exactly, not up to rounding
            dxs[0] = (xs[0] - ml - ol) * dys[0] * rl
            continue
        # dx = r * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - m - off) * r: off goes in the constant
        q = -rl * rl * rl * sgx / _as(rl, n)
        cst = -rl * sg / _as(rl, n) - ol * q if center else _as(rl, 0)
        _grad_line(xs, dys, dxs, ml, rl, q, cst, pdiv, w[base:])


@_serial
def _reduce_segments(x, g, has_g, K, nseg, parts, i0, i1):
    seg, line = i0 % nseg, i0 // nseg
    for item in range(i0, i1):
        lo = line * K + seg * SEGMENT
        hi = min(lo + SEGMENT, line * K + K)
        if has_g:
            m, m2, sg, co = _segment_co(x[lo:hi], g[lo:hi])
            parts[item, 2] = sg
            parts[item, 3] = co
        else:
            m, m2 = _segment(x[lo:hi])
            parts[item, 2] = 0.0
            parts[item, 3] = 0.0
        parts[item, 0] = m
        parts[item, 1] = m2
        seg, wrapped = _count(seg, nseg)
        line += wrapped


@_serial
def _reduce_tiles(x, g, has_g, A, W, R, WB, parts, t0, t1):
    nw = (W + WB - 1) // WB
    for t in range(t0, t1):
        tr = t // nw
        r0 = tr * R
        j0 = (t % nw) * WB
        o = r0 * W + j0
        _tile(x[o:], g[o:], has_g, min(R, A - r0), min(WB, W - j0), W, parts[tr * W + j0 :])


@_serial
def _merge_groups(parts, G1, B, G2, len1, step1, len2, step2, out):
    """Merge ``parts[(i1 * B + b) * G2 + i2]`` over (i1, i2) per group b, in that order, into ``out[:, b]``.

    Part (i1, i2) holds ``min(step1, len1 - i1 * step1) * min(step2, len2 - i2 * step2)`` elements.
    """
    for b in range(B):
        n = 0
        mean = 0.0
        m2 = 0.0
        sg = 0.0
        co = 0.0
        for i1 in range(G1):
            n1 = min(step1, len1 - i1 * step1)
            for i2 in range(G2):
                item = (i1 * B + b) * G2 + i2
                nb = n1 * min(step2, len2 - i2 * step2)
                n, mean, m2, sg, co = _merge(
                    n, mean, m2, sg, co, nb, parts[item, 0], parts[item, 1], parts[item, 2], parts[item, 3]
                )
        out[0, b] = mean
        out[1, b] = m2 / n
        out[2, b] = sg
        out[3, b] = co


@_serial
def _merge_tile_rows(parts, G1, W, A, R, cols):
    """Per column j: merge ``parts[tr * W + j]`` over the tile rows tr (R rows each, A in all) into ``cols[:, j]``.

    Every column of a tile row holds as many rows, so the merge factors are one per tile row and the
    loop over the columns vectorizes (Chan's formula, as :func:`_merge`).
    """
    for j in range(W):
        for f in range(4):
            cols[f, j] = parts[j, f]
    n = min(R, A)
    for tr in range(1, G1):
        nb = min(R, A - tr * R)
        total = n + nb
        f = nb / total
        g = n * f
        row = parts[tr * W : (tr + 1) * W]
        mean, m2, sg, co = cols[0], cols[1], cols[2], cols[3]
        for j in range(W):
            mb = row[j, 0]
            delta = mb - mean[j]
            new = mean[j] + delta * f
            m2[j] = m2[j] + row[j, 1] + delta * delta * g
            co[j] = co[j] + row[j, 3] + (mean[j] - new) * sg[j] + (mb - new) * row[j, 2]
            sg[j] = sg[j] + row[j, 2]
            mean[j] = new
        n = total


@_serial
def _merge_columns(cols, B, K, A, out):
    """Per group b: merge its K columns ``cols[:, b * K + k]`` (A rows each) into ``out[:, b]``."""
    for b in range(B):
        n = 0
        mean = 0.0
        m2 = 0.0
        sg = 0.0
        co = 0.0
        for k in range(K):
            j = b * K + k
            n, mean, m2, sg, co = _merge(n, mean, m2, sg, co, A, cols[0, j], cols[1, j], cols[2, j], cols[3, j])
        out[0, b] = mean
        out[1, b] = m2 / n
        out[2, b] = sg
        out[3, b] = co


# --------------------------------------------------------------------------- kernels
# Each splits its work into ``chunks`` contiguous ranges that run in parallel. One chunk runs on the
# calling thread without entering numba's parallel loop: that saves 1.4 us a call, as much as a
# small input's whole kernel takes. With more chunks than threads (large inputs), the caller sets
# numba's chunk size to 1 (compiled._run), which hands them out one at a time: on a shared machine a
# thread that lost its core holds up one chunk, not half of the work (numba's default splits the loop
# into one static range per thread). Set inside a kernel, it would make the kernel uncacheable.
@_kernel
def normalize(x, y, lines, K, P, sdiv, smod, pmod, pmul, pdiv, mean, var, eps, w, b, chunks):
    """``y = (x - mean[s]) * rstd[s] * w[p] + b[p]``, rstd = 1/sqrt(var + eps).

    ``P == 0``: a line at a time. ``P > 0`` (short lines): the map repeats every
    P lines; its per-element factors over one period are spread out first, and
    rows of P * K elements run as one vectorized loop.
    """
    rstd = _rstd(var, eps)
    if P == 0:
        if chunks == 1:
            _normalize_lines(x, y, 0, lines, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, b)
            return
        for c in prange(chunks):
            l0, l1 = c * lines // chunks, (c + 1) * lines // chunks
            _normalize_lines(x, y, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, b)
    else:
        mm = _spread_stats(P, K, sdiv, smod, mean)
        aa = _spread_scale(P, K, sdiv, smod, pmod, pmul, pdiv, rstd, w)
        bb = _spread_params(P, K, pmod, pmul, pdiv, b)
        rows = lines // P
        if chunks == 1:
            _normalize_rows(x, y, 0, rows, P * K, mm, aa, bb)
            return
        for c in prange(chunks):
            _normalize_rows(x, y, c * rows // chunks, (c + 1) * rows // chunks, P * K, mm, aa, bb)


@_kernel
def grad_input(x, dy, dx, lines, K, P, sdiv, smod, pmod, pmul, pdiv, mean, var, eps, w, c1, c2, training, chunks):
    """``dx = rstd * (dy * w[p] - c1[s] - (x - mean[s]) * rstd * c2[s])``; without ``training``, ``rstd * dy * w[p]``.

    ``P`` as in :func:`normalize`.
    """
    rstd = _rstd(var, eps)
    if P == 0:
        if chunks == 1:
            _grad_lines(x, dy, dx, 0, lines, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, c1, c2, training)
            return
        for c in prange(chunks):
            l0, l1 = c * lines // chunks, (c + 1) * lines // chunks
            _grad_lines(x, dy, dx, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, mean, rstd, w, c1, c2, training)
    else:
        q, cst = _grad_coefficients(rstd, c1, c2)
        pp = _spread_scale(P, K, sdiv, smod, pmod, pmul, pdiv, rstd, w)
        mm = _spread_stats(P, K, sdiv, smod, mean)
        qq = _spread_stats(P, K, sdiv, smod, q)
        cc = _spread_stats(P, K, sdiv, smod, cst)
        rows = lines // P
        if chunks == 1:
            _grad_rows(x, dy, dx, 0, rows, P * K, pp, mm, qq, cc, training)
            return
        for c in prange(chunks):
            _grad_rows(x, dy, dx, c * rows // chunks, (c + 1) * rows // chunks, P * K, pp, mm, qq, cc, training)


@_kernel
def forward_lines(x, y, lines, K, sdiv, smod, pmod, pmul, pdiv, w, b, eps, center, mean_out, var_out, chunks):
    """Training forward of the per-line kinds: each line's statistics, then its output while it is in cache.

    Returns how many of the statistics written are NaN or Inf (the layer's check, without a pass of NumPy calls).
    """
    if chunks == 1:
        _forward_lines(x, y, 0, lines, K, sdiv, smod, pmod, pmul, pdiv, w, b, eps, center, mean_out, var_out)
    else:
        for c in prange(chunks):
            l0, l1 = c * lines // chunks, (c + 1) * lines // chunks
            _forward_lines(x, y, l0, l1, K, sdiv, smod, pmod, pmul, pdiv, w, b, eps, center, mean_out, var_out)
    return _non_finite(mean_out) + _non_finite(var_out)


@_kernel
def backward_lines(x, dy, dx, lines, K, pmod, pmul, pdiv, w, eps, center, dw, db, chunks):
    """Training backward of the per-line kinds in one read of x and dy: a line's statistics, its sums, its dx.

    dweight and dbias accumulate per chunk in ``dw[c]``, ``db[c]`` (zeroed by the caller).
    """
    if chunks == 1:
        _backward_lines(x, dy, dx, 0, lines, K, pmod, pmul, pdiv, w, eps, center, dw[0], db[0])
        return
    for c in prange(chunks):
        l0, l1 = c * lines // chunks, (c + 1) * lines // chunks
        _backward_lines(x, dy, dx, l0, l1, K, pmod, pmul, pdiv, w, eps, center, dw[c], db[c])


@_kernel
def reduce_rows(x, g, has_g, A, B, K, nseg, parts, out, chunks):
    """Per group b of the lines a * B + b: ``out[:, b]`` = mean, biased variance, sum(g), co-moment.

    Each segment of every line gets a partial state (``parts[line * nseg + segment]``), in
    parallel; the partials then merge per group, in order, on the calling thread (there are
    SEGMENT times fewer of them than elements). Without ``has_g``, sum(g) and the co-moment are 0.
    """
    items = A * B * nseg
    if chunks == 1:
        _reduce_segments(x, g, has_g, K, nseg, parts, 0, items)
    else:
        for c in prange(chunks):
            _reduce_segments(x, g, has_g, K, nseg, parts, c * items // chunks, (c + 1) * items // chunks)
    _merge_groups(parts, A, B, nseg, A, 1, K, SEGMENT, out)


@_kernel
def reduce_cols(x, g, has_g, A, B, K, R, WB, parts, out, chunks):
    """As :func:`reduce_rows` for short lines: x as an (A, B * K) matrix, reduced per column.

    Tiles of R rows x WB columns give each column a partial state (``parts[tile_row * W + column]``);
    they merge per column over the tile rows (vectorized), then per group over its K columns.
    """
    W = B * K
    tiles = ((A + R - 1) // R) * ((W + WB - 1) // WB)
    if chunks == 1:
        _reduce_tiles(x, g, has_g, A, W, R, WB, parts, 0, tiles)
    else:
        for c in prange(chunks):
            _reduce_tiles(x, g, has_g, A, W, R, WB, parts, c * tiles // chunks, (c + 1) * tiles // chunks)
    cols = np.empty((4, W), dtype=np.float64)
    _merge_tile_rows(parts, (A + R - 1) // R, W, A, R, cols)
    _merge_columns(cols, B, K, A, out)


# --------------------------------------------------------------------------- channels first
# LayerNorm2d: x is (A, C, S) and statistic (a, s) reduces the channels x[a, :, s], S apart in
# memory. No line of the index map holds a statistic, so these kernels make the pixels the vector
# dimension: a tile is W consecutive pixels of one sample across all C channels (C rows of W, S
# apart). Its per-pixel sums run channel rows outer, pixels inner (vectorized), in buffers of W;
# the tile stays in L2 for its second statistics pass and its output (or gradient) passes.
@_helper
def _pixel_stats(x, C, S, W, center, eps, seg, acc, m, off, r, v):
    """Statistics of the W pixels ``x[c * S + p]`` (x a view from the tile's first element) over the C
    channels: mean as ``m + off`` (0 without centering), variance (mean square), rstd, in m, off, v, r.

    As :func:`_segment` per pixel, SEGMENT channels at a time (seg: three dtype buffers), and the
    segments merged with Chan's formula in float64 (acc: mean, M2), vectorized over the pixels.
    """
    z = _zero_of(x)
    s, cs, q = seg[0], seg[1], seg[2]
    mean, m2 = acc[0], acc[1]
    n = 0
    if not center:
        for p in range(W):
            mean[p] = 0.0
    for c0 in range(0, C, SEGMENT):
        c1 = min(c0 + SEGMENT, C)
        nb = c1 - c0
        k = _as(z, nb)
        for p in range(W):
            s[p] = z
        for c in range(c0, c1):
            xr = x[c * S : c * S + W]
            if center:
                for p in range(W):
                    s[p] += xr[p]
            else:
                for p in range(W):
                    s[p] += xr[p] * xr[p]
        if not center:  # a mean square: no cancellation, the segments add up
            for p in range(W):
                mean[p] += np.float64(s[p])
            n += nb
            continue
        for p in range(W):
            s[p] = s[p] / k
            cs[p] = z
            q[p] = z
        for c in range(c0, c1):
            xr = x[c * S : c * S + W]
            for p in range(W):
                d = xr[p] - s[p]
                cs[p] += d
                q[p] += d * d
        if n == 0:
            for p in range(W):
                sm2 = q[p] - cs[p] * cs[p] / k
                if sm2 < z:  # written so that NaN passes (max() would drop it)
                    sm2 = z
                mean[p] = np.float64(s[p]) + np.float64(cs[p] / k)
                m2[p] = sm2
        else:
            total = n + nb
            f = nb / total
            g = n * f
            for p in range(W):
                sm2 = q[p] - cs[p] * cs[p] / k
                if sm2 < z:
                    sm2 = z
                delta = np.float64(s[p]) + np.float64(cs[p] / k) - mean[p]
                mean[p] += delta * f
                m2[p] += sm2 + delta * delta * g
        n += nb
    one = _as(z, 1)
    for p in range(W):
        if center:
            m0 = _as(z, mean[p])
            m[p] = m0
            off[p] = _as(z, mean[p] - np.float64(m0))
            v[p] = _as(z, m2[p] / C)
        else:
            m[p] = z
            off[p] = z
            v[p] = _as(z, mean[p] / C)
        r[p] = one / np.sqrt(v[p] + eps)


@_helper
def _pixel_buffers(P, dtype, count):
    """``count`` per-pixel buffers of the dtype and two float64 ones (the segment merge's state)."""
    return np.empty((count, P), dtype=dtype), np.empty((2, P), dtype=np.float64)


@_serial
def _forward_pixels(x, y, C, S, P, w, b, eps, center, mean_out, var_out, t0, t1):
    """Training forward of tiles [t0, t1) (``(S + P - 1) // P`` tiles of P pixels per sample)."""
    tiles = (S + P - 1) // P
    buf, acc = _pixel_buffers(P, x.dtype, 7)
    seg, m, off, r, v = buf[0:3], buf[3], buf[4], buf[5], buf[6]
    for t in range(t0, t1):
        a = t // tiles
        p0 = (t % tiles) * P
        W = min(P, S - p0)
        base = a * C * S + p0
        xt, yt = x[base:], y[base:]
        _pixel_stats(xt, C, S, W, center, eps, seg, acc, m, off, r, v)
        mo, vo = mean_out[a * S + p0 : a * S + p0 + W], var_out[a * S + p0 : a * S + p0 + W]
        for p in range(W):
            mo[p] = m[p]
            vo[p] = v[p]
        for c in range(C):
            xr, yr = xt[c * S : c * S + W], yt[c * S : c * S + W]
            wc, bc = w[c], b[c]
            for p in range(W):
                yr[p] = (xr[p] - m[p]) * (r[p] * wc) + bc


@_serial
def _backward_pixels(x, dy, dx, C, S, P, w, eps, center, dw, db, t0, t1):
    """Training backward of tiles [t0, t1): statistics, per-pixel sums of g = dy * w[c] and g * (x - mean)
    (dweight, dbias per channel into dw, db), then dx, all while the tile is in cache."""
    tiles = (S + P - 1) // P
    buf, acc = _pixel_buffers(P, x.dtype, 9)
    seg, m, off, r, v, sg, sgx = buf[0:3], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8]
    z = _zero_of(x)
    n = _as(z, C)
    for t in range(t0, t1):
        a = t // tiles
        p0 = (t % tiles) * P
        W = min(P, S - p0)
        base = a * C * S + p0
        xt, dyt, dxt = x[base:], dy[base:], dx[base:]
        _pixel_stats(xt, C, S, W, center, eps, seg, acc, m, off, r, v)
        for p in range(W):
            sg[p] = z
            sgx[p] = z
        for c in range(C):
            xr, dyr = xt[c * S : c * S + W], dyt[c * S : c * S + W]
            wc = w[c]
            sdy = z
            sdyx = z
            for p in range(W):
                d = dyr[p]
                xm = (xr[p] - m[p]) - off[p]
                sdy += d
                sdyx += d * xm * r[p]
                sg[p] += d * wc
                sgx[p] += d * wc * xm
            dw[c] += sdyx
            db[c] += sdy
        # dx = r * (g - mean(g) - xhat * mean(g * xhat)), xhat = (x - m - off) * r: off goes in the constant
        for p in range(W):
            rp = r[p]
            qp = -rp * rp * rp * sgx[p] / n
            sgx[p] = qp
            sg[p] = -rp * sg[p] / n - off[p] * qp if center else z
        for c in range(C):
            xr, dyr, dxr = xt[c * S : c * S + W], dyt[c * S : c * S + W], dxt[c * S : c * S + W]
            wc = w[c]
            for p in range(W):
                dxr[p] = dyr[p] * (r[p] * wc) + (xr[p] - m[p]) * sgx[p] + sg[p]


@_kernel
def forward_pixels(x, y, A, C, S, P, w, b, eps, center, mean_out, var_out, chunks):
    """Training forward with statistics over the channels of (A, C, S) per sample and pixel (LayerNorm2d).

    Returns how many of the statistics written are NaN or Inf, as :func:`forward_lines`.
    """
    tiles = A * ((S + P - 1) // P)
    if chunks == 1:
        _forward_pixels(x, y, C, S, P, w, b, eps, center, mean_out, var_out, 0, tiles)
    else:
        for c in prange(chunks):
            t0, t1 = c * tiles // chunks, (c + 1) * tiles // chunks
            _forward_pixels(x, y, C, S, P, w, b, eps, center, mean_out, var_out, t0, t1)
    return _non_finite(mean_out) + _non_finite(var_out)


@_kernel
def backward_pixels(x, dy, dx, A, C, S, P, w, eps, center, dw, db, chunks):
    """Training backward of :func:`forward_pixels`' normalization in one read of x and dy.

    dweight and dbias accumulate per chunk in ``dw[c]``, ``db[c]`` (zeroed by the caller).
    """
    tiles = A * ((S + P - 1) // P)
    if chunks == 1:
        _backward_pixels(x, dy, dx, C, S, P, w, eps, center, dw[0], db[0], 0, tiles)
        return
    for c in prange(chunks):
        t0, t1 = c * tiles // chunks, (c + 1) * tiles // chunks
        _backward_pixels(x, dy, dx, C, S, P, w, eps, center, dw[c], db[c], t0, t1)


# --------------------------------------------------------------------------- running statistics
@numba.njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)  # no fastmath: NumPy's roundings
def track_running(mean, var, mean_scale, var_scale, factor, running_mean, running_var, out):
    """A training batch folded into the running statistics, with the layer's checks, in one call.

    ``mean`` and ``var`` are the batch's statistics, ``rows`` per channel (instance norm: one per
    sample) laid out as (rows, channels). Per channel: the batch mean and variance, ``sum(rows) *
    mean_scale`` and ``sum(rows) * var_scale``, into ``out[2]`` and ``out[3]``; the new running mean
    and variance, ``(1 - factor) * running + factor * batch``, into ``out[0]`` and ``out[1]``.
    The same operations in the same order as the NumPy update in ``base._after_training_batch``.
    Returns 1 when the batch's statistics hold NaN or Inf (nothing is written), 2 when the new
    running statistics do (they overflow), else 0.
    """
    if _non_finite(mean) + _non_finite(var):
        return 1
    channels = running_mean.size
    rows = var.size // channels
    z = _zero_of(running_mean)
    ms, vs, f, keep = _as(z, mean_scale), _as(z, var_scale), _as(z, factor), _as(z, 1.0 - factor)
    for c in range(channels):
        sm = mean[c]
        sv = var[c]
        for r in range(1, rows):
            sm += mean[r * channels + c]
            sv += var[r * channels + c]
        out[2, c] = sm * ms
        out[3, c] = sv * vs
        out[0, c] = keep * running_mean[c] + f * out[2, c]
        out[1, c] = keep * running_var[c] + f * out[3, c]
    return 2 if _non_finite(out[0]) + _non_finite(out[1]) else 0


# --------------------------------------------------------------------------- signatures
#: Argument kinds: r/w read-only/writable 1-D arrays of the dtype, s a scalar of the dtype, i int64,
#: F writable 2-D float64 (partial states), O writable 2-D of the dtype, d a float64 scalar.
#: In the order of their compile times, longest first (both signatures, on the 2-core machine: 18.6, 10.7,
#: 10.4, 9.0, 7.7, 5.6, 5.6, 3.8 and 0.8 s): parallel_compile hands them out in this order, which balances
#: the helpers of a first start.
_ARGS = {
    "backward_lines": "rrwiiiiirsiOOi",
    "forward_lines": "rwiiiiiiirrsiwwi",
    "backward_pixels": "rrwiiiirsiOOi",
    "forward_pixels": "rwiiiirrsiwwi",
    "grad_input": "rrwiiiiiiiirrsrrrii",
    "normalize": "rwiiiiiiiirrsrri",
    "reduce_cols": "rriiiiiiFOi",
    "reduce_rows": "rriiiiiFOi",
    "track_running": "rrdddrrO",
}
KERNELS = {name: globals()[name] for name in _ARGS}


def _signature(spec: str, dtype: types.Float) -> tuple:
    kinds = {
        "r": types.Array(dtype, 1, "C", readonly=True),
        "w": types.Array(dtype, 1, "C"),
        "s": dtype,
        "i": types.int64,
        "F": types.Array(types.float64, 2, "C"),
        "O": types.Array(dtype, 2, "C"),
        "d": types.float64,
    }
    return tuple(kinds[k] for k in spec)


#: Every signature a call can need: each kernel for float32 and for float64 data.
SIGNATURES = {
    name: [_signature(spec, dtype) for dtype in (types.float32, types.float64)] for name, spec in _ARGS.items()
}
