// Fused normalization kernels for normkernels' CUDA layers.
//
// Every kind is one geometry (see normkernels/fused.py): x is a run of
// `lines` contiguous lines of K elements, and an element (line, k) belongs to
//   statistic  s = (line / sdiv) % smod
//   parameter  p = (line % pmod) * pmul + (pdiv ? k / pdiv : 0)
// Reductions group the lines further: line = a * B + b for a < A, and group b
// gathers all (a, k). Batch norm over (N, C, S) is A=N, B=C, K=S; the
// per-row kinds (instance, group, layer, RMS norm) are A=1.
//
// Reductions keep a Welford state per thread (count, mean of x, M2 of x, and
// for backward the mean of g = dy [* weight] and the co-moment of x and g),
// merge threads with Chan's formula, and write one partial state per block;
// `nk_merge_*` merges the partials per group. Sums accumulate in float for
// half, bfloat16 and float inputs, in double when the computation is float64.
//
// Half and bfloat16 are converted with PTX instructions rather than
// cuda_fp16.h/cuda_bf16.h, so this file needs no headers under NVRTC or nvcc.
// Kernels are extern "C" with a <storage>_<accumulator> suffix; the file
// instantiates every combination, so compiling it with nvcc checks them all.

typedef unsigned short nk_u16;
struct __align__(2) nk_half { nk_u16 bits; };
struct __align__(2) nk_bfloat16 { nk_u16 bits; };

// ----------------------------------------------------------------- conversions
template <typename T, typename A> struct Convert;

template <typename A> struct Convert<float, A> {
    static __device__ __forceinline__ A load(float v) { return (A)v; }
    static __device__ __forceinline__ float store(A v) { return (float)v; }
};

template <typename A> struct Convert<double, A> {
    static __device__ __forceinline__ A load(double v) { return (A)v; }
    static __device__ __forceinline__ double store(A v) { return (double)v; }
};

// Half and bfloat16 stores go through float also from a double accumulator, as PyTorch's
// conversions do (c10::Half and c10::BFloat16 take a float): the rare tie that rounds twice
// rounds as torch's does.
template <typename A> struct Convert<nk_half, A> {
    static __device__ __forceinline__ A load(nk_half v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
        return (A)f;
    }
    static __device__ __forceinline__ nk_half store(A v) {
        nk_half h;
        float f = (float)v;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
        return h;
    }
};

template <typename A> struct Convert<nk_bfloat16, A> {
    static __device__ __forceinline__ A load(nk_bfloat16 v) {
        return (A)__uint_as_float(((unsigned int)v.bits) << 16);  // exact: bfloat16 is float's top half
    }
    static __device__ __forceinline__ nk_bfloat16 store(A v) {
        nk_bfloat16 h;
        float f = (float)v;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));  // round to nearest even; sm_80+
        return h;
    }
};

template <typename A> __device__ __forceinline__ A nk_rsqrt(A var, double eps) {
    return (A)1 / sqrt(var + (A)eps);  // IEEE sqrt and division: rsqrt()'s 2 ulp would show in float64
}

// ----------------------------------------------------------------- index map
struct IndexMap {
    long long sdiv, smod, pmod, pmul, pdiv;

    __device__ __forceinline__ long long stat(long long line) const { return (line / sdiv) % smod; }
    __device__ __forceinline__ long long param_base(long long line) const { return (line % pmod) * pmul; }
    __device__ __forceinline__ long long param(long long base, long long k) const {
        return pdiv == 0 ? base : base + (pdiv == 1 ? k : k / pdiv);
    }
};

// ----------------------------------------------------------------- reduction states
// Welford state of x and, with DY, of g and the co-moment sum (x - mean_x)(g - mean_g).
template <typename A, bool DY> struct Welford {
    A n, mx, m2, mg, c;

    __device__ __forceinline__ void zero() { n = mx = m2 = mg = c = (A)0; }

    __device__ __forceinline__ void push(A x, A g) {
        n += (A)1;
        const A inv = (A)1 / n;
        const A dx = x - mx;
        mx += dx * inv;
        m2 += dx * (x - mx);
        if (DY) {
            const A dg = g - mg;
            mg += dg * inv;
            c += dx * (g - mg);
        }
    }

    // Chan et al.: merge the state of a disjoint set of elements.
    __device__ __forceinline__ void merge(const Welford& o) {
        if (o.n == (A)0) return;
        if (n == (A)0) {
            *this = o;
            return;
        }
        const A total = n + o.n;
        const A wo = o.n / total;
        const A dx = o.mx - mx;
        m2 += o.m2 + dx * dx * n * wo;
        mx += dx * wo;
        if (DY) {
            const A dg = o.mg - mg;
            c += o.c + dx * dg * n * wo;
            mg += dg * wo;
        }
        n = total;
    }

    __device__ __forceinline__ Welford shfl_down(int offset) const {
        Welford o;
        o.n = __shfl_down_sync(0xffffffffu, n, offset);
        o.mx = __shfl_down_sync(0xffffffffu, mx, offset);
        o.m2 = __shfl_down_sync(0xffffffffu, m2, offset);
        o.mg = DY ? __shfl_down_sync(0xffffffffu, mg, offset) : (A)0;
        o.c = DY ? __shfl_down_sync(0xffffffffu, c, offset) : (A)0;
        return o;
    }

    static const int FIELDS = DY ? 5 : 3;
    __device__ __forceinline__ void save(A* out, long long stride) const {
        out[0] = n;
        out[stride] = mx;
        out[2 * stride] = m2;
        if (DY) {
            out[3 * stride] = mg;
            out[4 * stride] = c;
        }
    }
    __device__ __forceinline__ void restore(const A* in, long long stride) {
        n = in[0];
        mx = in[stride];
        m2 = in[2 * stride];
        mg = DY ? in[3 * stride] : (A)0;
        c = DY ? in[4 * stride] : (A)0;
    }

    // Merged result per group: mean, biased variance, and with DY sum(g) and sum(g * (x - mean)).
    static const int OUTPUTS = DY ? 4 : 2;
    __device__ __forceinline__ void emit(A* out, long long stride) const {
        out[0] = mx;
        out[stride] = n > (A)0 ? m2 / n : (A)0;
        if (DY) {
            out[2 * stride] = mg * n;
            out[3 * stride] = c;
        }
    }
};

// Plain sums: sum(dy) and sum(dy * xhat) with known statistics.
template <typename A> struct Sums {
    A s1, s2;

    __device__ __forceinline__ void zero() { s1 = s2 = (A)0; }
    __device__ __forceinline__ void merge(const Sums& o) {
        s1 += o.s1;
        s2 += o.s2;
    }
    __device__ __forceinline__ Sums shfl_down(int offset) const {
        Sums o;
        o.s1 = __shfl_down_sync(0xffffffffu, s1, offset);
        o.s2 = __shfl_down_sync(0xffffffffu, s2, offset);
        return o;
    }
    static const int FIELDS = 2;
    __device__ __forceinline__ void save(A* out, long long stride) const {
        out[0] = s1;
        out[stride] = s2;
    }
    __device__ __forceinline__ void restore(const A* in, long long stride) {
        s1 = in[0];
        s2 = in[stride];
    }
    static const int OUTPUTS = 2;
    __device__ __forceinline__ void emit(A* out, long long stride) const { save(out, stride); }
};

// ----------------------------------------------------------------- reduction operations
// What a reduction reads per element. `line(l)` caches what is constant along a line.
struct Operands {
    const void* x;
    const void* dy;
    const void* mean;
    const void* var;
    const void* weight;
    double eps;
    IndexMap map;
};

// Moments of x, or (DY) with the co-moment of x and g = dy [* weight[p] when WEIGHTED].
template <typename T, typename A, bool DY, bool WEIGHTED> struct MomentsOp {
    typedef Welford<A, DY> State;
    struct Line {
        long long pbase;
    };
    const T* x;
    const T* dy;
    const A* weight;
    IndexMap map;

    __device__ MomentsOp(const Operands& o)
        : x((const T*)o.x), dy((const T*)o.dy), weight((const A*)o.weight), map(o.map) {}
    __device__ __forceinline__ Line line(long long l) const {
        Line r;
        r.pbase = WEIGHTED ? map.param_base(l) : 0;
        return r;
    }
    __device__ __forceinline__ void push(State& s, const Line& ln, long long off, long long k) const {
        A g = (A)0;
        if (DY) {
            g = Convert<T, A>::load(dy[off]);
            if (WEIGHTED) g *= weight[map.param(ln.pbase, k)];
        }
        s.push(Convert<T, A>::load(x[off]), g);
    }
};

// sum(dy) and sum(dy * xhat) with given statistics (mean may be null: no centering).
template <typename T, typename A> struct GradSumsOp {
    typedef Sums<A> State;
    struct Line {
        A mean, rstd;
    };
    const T* x;
    const T* dy;
    const A* mean;
    const A* var;
    double eps;
    IndexMap map;

    __device__ GradSumsOp(const Operands& o)
        : x((const T*)o.x), dy((const T*)o.dy), mean((const A*)o.mean), var((const A*)o.var), eps(o.eps),
          map(o.map) {}
    __device__ __forceinline__ Line line(long long l) const {
        const long long s = map.stat(l);
        Line r;
        r.mean = mean ? mean[s] : (A)0;
        r.rstd = nk_rsqrt(var[s], eps);
        return r;
    }
    __device__ __forceinline__ void push(State& s, const Line& ln, long long off, long long) const {
        const A d = Convert<T, A>::load(dy[off]);
        s.s1 += d;
        s.s2 += d * ((Convert<T, A>::load(x[off]) - ln.mean) * ln.rstd);
    }
};

// ----------------------------------------------------------------- block reductions
template <typename S> __device__ __forceinline__ S warp_reduce(S s) {
    for (int offset = 16; offset > 0; offset >>= 1) s.merge(s.shfl_down(offset));
    return s;
}

// Reduce over a 1-D block; the result is valid in thread 0. Blocks are a multiple of 32 threads.
template <typename S> __device__ S block_reduce(S s) {
    __shared__ S warps[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    s = warp_reduce(s);
    if (lane == 0) warps[warp] = s;
    __syncthreads();
    if (warp == 0) {
        if (lane < (int)(blockDim.x >> 5)) {
            s = warps[lane];
        } else {
            s.zero();
        }
        s = warp_reduce(s);
    }
    __syncthreads();  // `warps` is reused by the caller's next group
    return s;
}

// Row layout: block (split, group) walks its chunk of the group's A*K elements,
// consecutive threads on consecutive k (coalesced when K is not tiny).
template <typename Op, typename Acc>
__device__ void reduce_rows_body(const Operands& operands, long long A_, long long B, long long K, long long chunk,
                                 Acc* partial) {
    typedef typename Op::State State;
    const Op op(operands);
    const long long total = A_ * K, splits = gridDim.x;
    const long long lo = blockIdx.x * chunk, hi = min(total, lo + chunk);
    const long long step = blockDim.x, step_a = step / K, step_k = step - step_a * K;
    for (long long b = blockIdx.y; b < B; b += gridDim.y) {
        State s;
        s.zero();
        long long i = lo + threadIdx.x;
        long long a = i / K, k = i - a * K;
        long long current = -1;
        typename Op::Line ln;
        for (; i < hi; i += step) {
            const long long line = a * B + b;
            if (line != current) {
                ln = op.line(line);
                current = line;
            }
            op.push(s, ln, line * K + k, k);
            k += step_k;
            a += step_a;
            if (k >= K) {
                k -= K;
                a += 1;
            }
        }
        s = block_reduce(s);
        if (threadIdx.x == 0) s.save(partial + blockIdx.x * B + b, splits * B);
    }
}

// Column layout for short lines (K small, e.g. batch norm over (N, C)): a 32 x 8
// block; x-threads own consecutive columns j of the (A, B*K) matrix, y-threads
// and grid.y split the rows. One partial per (split, column).
template <typename Op, typename Acc>
__device__ void reduce_cols_body(const Operands& operands, long long A_, long long B, long long K, long long chunk,
                                 Acc* partial) {
    typedef typename Op::State State;
    __shared__ State rows[8][33];
    const Op op(operands);
    const long long columns = B * K, splits = gridDim.y;
    const long long j = (long long)blockIdx.x * 32 + threadIdx.x;
    const long long lo = blockIdx.y * chunk, hi = min(A_, lo + chunk);
    State s;
    s.zero();
    if (j < columns) {
        const long long b = j / K, k = j - b * K;
        for (long long a = lo + threadIdx.y; a < hi; a += blockDim.y) {
            const long long line = a * B + b;
            op.push(s, op.line(line), a * columns + j, k);
        }
    }
    rows[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && j < columns) {
        for (int r = 1; r < (int)blockDim.y; ++r) s.merge(rows[r][threadIdx.x]);
        s.save(partial + blockIdx.y * columns + j, splits * columns);
    }
}

// Merge the partials of each group: [FIELDS][splits][B][Kp] -> [OUTPUTS][B].
template <typename State, typename Acc>
__device__ void merge_body(const Acc* partial, long long splits, long long B, long long Kp, Acc* out) {
    const long long plane = splits * B * Kp;
    for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < B; b += (long long)gridDim.x * blockDim.x) {
        State s;
        s.zero();
        for (long long split = 0; split < splits; ++split) {
            for (long long k = 0; k < Kp; ++k) {
                State o;
                o.restore(partial + (split * B + b) * Kp + k, plane);
                s.merge(o);
            }
        }
        s.emit(out + b, B);
    }
}

// ----------------------------------------------------------------- elementwise passes
// Line mode: grid.y walks lines, grid.x and the threads walk k (long lines).
// Flat mode: one grid-stride loop over elements (short lines).
template <typename Op> __device__ void elementwise_body(const Op& op, long long lines, long long K, int flat) {
    if (flat) {
        const long long total = lines * K;
        for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
             e += (long long)gridDim.x * blockDim.x) {
            const long long line = e / K;
            op.apply(op.line(line), e, e - line * K);
        }
        return;
    }
    for (long long line = blockIdx.y; line < lines; line += gridDim.y) {
        const typename Op::Line ln = op.line(line);
        const long long base = line * K;
        for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < K; k += (long long)gridDim.x * blockDim.x)
            op.apply(ln, base + k, k);
    }
}

// What is constant along a line: its statistic's mean and 1/std, and its first parameter index.
template <typename A> struct StatLine {
    A mean, rstd;
    long long pbase;
};

// Per-statistic mean (null: no centering) and variance, looked up per line.
template <typename A> struct LineStats {
    const A* mean;
    const A* var;
    double eps;
    IndexMap map;

    __device__ __forceinline__ StatLine<A> at(long long l) const {
        const long long s = map.stat(l);
        StatLine<A> r;
        r.mean = mean ? mean[s] : (A)0;
        r.rstd = nk_rsqrt(var[s], eps);
        r.pbase = map.param_base(l);
        return r;
    }
};

// y = (x - mean[s]) * rstd[s] * weight[p] + bias[p]; any of mean, weight, bias may be null.
template <typename T, typename A> struct NormalizeOp {
    typedef StatLine<A> Line;
    const T* x;
    T* y;
    const A* weight;
    const A* bias;
    LineStats<A> stats;

    __device__ NormalizeOp(const T* x_, T* y_, const A* weight_, const A* bias_, LineStats<A> stats_)
        : x(x_), y(y_), weight(weight_), bias(bias_), stats(stats_) {}
    __device__ __forceinline__ Line line(long long l) const { return stats.at(l); }
    __device__ __forceinline__ void apply(const Line& ln, long long e, long long k) const {
        A v = (Convert<T, A>::load(x[e]) - ln.mean) * ln.rstd;
        if (weight || bias) {
            const long long p = stats.map.param(ln.pbase, k);
            if (weight) v *= weight[p];
            if (bias) v += bias[p];
        }
        y[e] = Convert<T, A>::store(v);
    }
};

// dx = rstd * (g - c1[s] - xhat * c2[s]), g = dy * weight[p], xhat = (x - mean[s]) * rstd.
// Training passes c1 = mean(g) (null without centering) and c2 = mean(g * xhat);
// constant statistics pass neither: dx = rstd * g.
template <typename T, typename A> struct GradInputOp {
    struct Line {
        StatLine<A> s;
        A c1, c2;
    };
    const T* x;
    const T* dy;
    T* dx;
    const A* weight;
    const A* c1;
    const A* c2;
    LineStats<A> stats;

    __device__ GradInputOp(const T* x_, const T* dy_, T* dx_, const A* weight_, const A* c1_, const A* c2_,
                           LineStats<A> stats_)
        : x(x_), dy(dy_), dx(dx_), weight(weight_), c1(c1_), c2(c2_), stats(stats_) {}
    __device__ __forceinline__ Line line(long long l) const {
        Line r;
        r.s = stats.at(l);
        const long long s = stats.map.stat(l);
        r.c1 = c1 ? c1[s] : (A)0;
        r.c2 = c2 ? c2[s] : (A)0;
        return r;
    }
    __device__ __forceinline__ void apply(const Line& ln, long long e, long long k) const {
        A g = Convert<T, A>::load(dy[e]);
        if (weight) g *= weight[stats.map.param(ln.s.pbase, k)];
        A v = g - ln.c1;
        if (c2) v -= (Convert<T, A>::load(x[e]) - ln.s.mean) * ln.s.rstd * ln.c2;
        dx[e] = Convert<T, A>::store(v * ln.s.rstd);
    }
};

// One block per line for the per-row kinds (A = 1): statistics, then normalize
// the line while it is still in L1/L2. One launch for a training forward.
template <typename T, typename A>
__device__ void forward_lines_body(const T* x, T* y, const A* weight, const A* bias, double eps, long long lines,
                                   long long K, IndexMap map, int center, A* mean_out, A* var_out) {
    __shared__ A line_stats[2];
    for (long long line = blockIdx.x; line < lines; line += gridDim.x) {
        const T* xl = x + line * K;
        Welford<A, false> s;
        s.zero();
        for (long long k = threadIdx.x; k < K; k += blockDim.x) s.push(Convert<T, A>::load(xl[k]), (A)0);
        s = block_reduce(s);
        if (threadIdx.x == 0) {
            const A var = s.m2 / s.n;
            // RMS norm: no centering, and its "variance" is the mean square.
            line_stats[0] = center ? s.mx : (A)0;
            line_stats[1] = center ? var : var + s.mx * s.mx;
            const long long st = map.stat(line);
            mean_out[st] = s.mx;
            var_out[st] = line_stats[1];
        }
        __syncthreads();
        const LineStats<A> unused = {0, 0, eps, map};  // the line's statistics are in line_stats
        const NormalizeOp<T, A> op(x, y, weight, bias, unused);
        StatLine<A> ln;
        ln.mean = line_stats[0];
        ln.rstd = nk_rsqrt(line_stats[1], eps);
        ln.pbase = map.param_base(line);
        for (long long k = threadIdx.x; k < K; k += blockDim.x) op.apply(ln, line * K + k, k);
        // No barrier before the next line rewrites line_stats: its block_reduce passes two first.
    }
}

// ----------------------------------------------------------------- extern "C" entry points
#define NK_MAP long long sdiv, long long smod, long long pmod, long long pmul, long long pdiv
#define NK_MAP_INIT {sdiv, smod, pmod, pmul, pdiv}

#define NK_REDUCTION(NAME, TS, T, AS, A, ...)                                                                    \
    extern "C" __global__ void nk_reduce_rows_##NAME##_##TS##_##AS(                                               \
        const T* x, const T* dy, const A* mean, const A* var, const A* weight, double eps, long long A_,           \
        long long B, long long K, long long chunk, NK_MAP, A* partial) {                                          \
        const Operands o = {x, dy, mean, var, weight, eps, NK_MAP_INIT};                                          \
        reduce_rows_body<__VA_ARGS__, A>(o, A_, B, K, chunk, partial);                                                     \
    }                                                                                                             \
    extern "C" __global__ void nk_reduce_cols_##NAME##_##TS##_##AS(                                               \
        const T* x, const T* dy, const A* mean, const A* var, const A* weight, double eps, long long A_,           \
        long long B, long long K, long long chunk, NK_MAP, A* partial) {                                          \
        const Operands o = {x, dy, mean, var, weight, eps, NK_MAP_INIT};                                          \
        reduce_cols_body<__VA_ARGS__, A>(o, A_, B, K, chunk, partial);                                                     \
    }

#define NK_KERNELS(TS, T, AS, A)                                                                                  \
    NK_REDUCTION(moments, TS, T, AS, A, MomentsOp<T, A, false, false>)                                          \
    NK_REDUCTION(comoments, TS, T, AS, A, MomentsOp<T, A, true, false>)                                         \
    NK_REDUCTION(comoments_weighted, TS, T, AS, A, MomentsOp<T, A, true, true>)                                 \
    NK_REDUCTION(grad_sums, TS, T, AS, A, GradSumsOp<T, A>)                                                     \
    extern "C" __global__ void nk_normalize_##TS##_##AS(const T* x, T* y, const A* mean, const A* var, double eps, \
                                                        const A* weight, const A* bias, long long lines,          \
                                                        long long K, NK_MAP, int flat) {                          \
        const LineStats<A> stats = {mean, var, eps, NK_MAP_INIT};                                                 \
        const NormalizeOp<T, A> op(x, y, weight, bias, stats);                                                    \
        elementwise_body(op, lines, K, flat);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void nk_grad_input_##TS##_##AS(                                                         \
        const T* x, const T* dy, T* dx, const A* mean, const A* var, double eps, const A* weight, const A* c1,     \
        const A* c2, long long lines, long long K, NK_MAP, int flat) {                                            \
        const LineStats<A> stats = {mean, var, eps, NK_MAP_INIT};                                                 \
        const GradInputOp<T, A> op(x, dy, dx, weight, c1, c2, stats);                                             \
        elementwise_body(op, lines, K, flat);                                                                     \
    }                                                                                                             \
    extern "C" __global__ void nk_forward_lines_##TS##_##AS(const T* x, T* y, const A* weight, const A* bias,      \
                                                            double eps, long long lines, long long K, NK_MAP,     \
                                                            int center, A* mean_out, A* var_out) {                \
        forward_lines_body<T, A>(x, y, weight, bias, eps, lines, K, IndexMap NK_MAP_INIT, center, mean_out,       \
                                 var_out);                                                                        \
    }

#define NK_MERGES(AS, A)                                                                                          \
    extern "C" __global__ void nk_merge_moments_##AS(const A* partial, long long splits, long long B, long long Kp, \
                                                     A* out) {                                                    \
        merge_body<Welford<A, false>, A>(partial, splits, B, Kp, out);                                            \
    }                                                                                                             \
    extern "C" __global__ void nk_merge_comoments_##AS(const A* partial, long long splits, long long B,            \
                                                       long long Kp, A* out) {                                    \
        merge_body<Welford<A, true>, A>(partial, splits, B, Kp, out);                                             \
    }                                                                                                             \
    extern "C" __global__ void nk_merge_grad_sums_##AS(const A* partial, long long splits, long long B,            \
                                                       long long Kp, A* out) {                                    \
        merge_body<Sums<A>, A>(partial, splits, B, Kp, out);                                                      \
    }

NK_MERGES(f32, float)
NK_MERGES(f64, double)
NK_KERNELS(f16, nk_half, f32, float)
NK_KERNELS(bf16, nk_bfloat16, f32, float)
NK_KERNELS(f32, float, f32, float)
NK_KERNELS(f16, nk_half, f64, double)
NK_KERNELS(bf16, nk_bfloat16, f64, double)
NK_KERNELS(f32, float, f64, double)
NK_KERNELS(f64, double, f64, double)
