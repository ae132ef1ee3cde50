// CUDA as C++20 for the CPU: the keywords, index variables and intrinsics that
// normkernels/cuda/*.cu use, on top of the fiber runtime (fibers.h).
//
// Only what the sources use is here, so a kernel that starts using something new fails to
// compile, naming it, rather than running on a guess. The inline PTX and __shared__
// declarations need source rewrites (tests/cudasim/rewrite.py), not macros.
#pragma once

#include "fibers.h"

// ----------------------------------------------------------------- keywords
#ifdef NKSIM_SIGNATURES
#define __global__ __nksim_global__  // kept visible in `g++ -E` output, where the loader reads signatures
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __align__(n) alignas(n)
#define __restrict__ __restrict

// A __shared__ declaration, as rewrite.py writes it: `NKSIM_SHARED(name, [dims], type)`.
#define NKSIM_SHARED(name, dims, ...)                                                 \
    static ::nksim::SharedSlot<__VA_ARGS__ dims> name##_nksim_shared;                  \
    __VA_ARGS__(&name) dims = name##_nksim_shared.get()

// ----------------------------------------------------------------- index variables
#define threadIdx (::nksim::thread_idx())
#define blockIdx (::nksim::block_idx())
#define blockDim (::nksim::block_dim())
#define gridDim (::nksim::grid_dim())
#define warpSize 32

// ----------------------------------------------------------------- synchronization
#define __syncthreads() ::nksim::syncthreads(__LINE__)
#define __shfl_down_sync(mask, var, ...) ::nksim::shfl_down_sync(__LINE__, mask, var, __VA_ARGS__)

// ----------------------------------------------------------------- math
using std::sqrt;  // the float overload, as CUDA's sqrt(float)

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

inline float __uint_as_float(unsigned int u) { return std::bit_cast<float>(u); }
inline unsigned int __float_as_uint(float f) { return std::bit_cast<unsigned int>(f); }

// ----------------------------------------------------------------- the PTX conversions rewrite.py maps to
namespace nksim {
// cvt.f32.f16: exact.
inline float ptx_cvt_f32_f16(unsigned short h) {
    const unsigned sign = (unsigned)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    unsigned bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);  // inf, NaN (payload kept)
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else if (!mant) {
        bits = sign;
    } else {  // subnormal: normalize
        int e = -1;
        unsigned m = mant;
        do {
            ++e;
            m <<= 1;
        } while (!(m & 0x400u));
        bits = sign | ((unsigned)(112 - e) << 23) | ((m & 0x3FFu) << 13);
    }
    return std::bit_cast<float>(bits);
}

// cvt.rn.f16.f32: round to nearest even; NaN gives the canonical NaN.
inline unsigned short ptx_cvt_rn_f16_f32(float f) {
    const unsigned x = std::bit_cast<unsigned>(f), sign = (x >> 16) & 0x8000u, a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return 0x7FFF;
    if (a >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);  // >= 65520 rounds to infinity
    if (a >= 0x38800000u) {                                           // normal half
        const unsigned v = a - 0x38000000u;
        return (unsigned short)(sign | ((v + 0xFFFu + ((v >> 13) & 1u)) >> 13));
    }
    const unsigned e = a >> 23;
    if (e < 102) return (unsigned short)sign;  // below a quarter of the smallest subnormal
    const unsigned m = (a & 0x7FFFFFu) | 0x800000u, shift = 126 - e;
    unsigned q = m >> shift;
    const unsigned rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return (unsigned short)(sign | q);
}

// cvt.rn.bf16.f32: round to nearest even; NaN gives the canonical NaN.
inline unsigned short ptx_cvt_rn_bf16_f32(float f) {
    const unsigned x = std::bit_cast<unsigned>(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    return (unsigned short)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}
}  // namespace nksim
