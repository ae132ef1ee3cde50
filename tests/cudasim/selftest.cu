// Kernels that test the harness itself (tests/test_cudasim.py): warp shuffles, barriers, shared
// memory, faults, and the PTX conversions, written as normkernels/cuda/*.cu writes them.


extern "C" __global__ void t_shfl_down_f32(float* out, int delta, int width, unsigned int mask) {
    const int lane = threadIdx.x & 31, i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = 1.5f * i;
    if ((mask >> lane) & 1u) {
        out[i] = __shfl_down_sync(mask, v, delta, width);
    } else {
        out[i] = -1.0f;
    }
}

extern "C" __global__ void t_shfl_down_f64(double* out, int delta) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    out[i] = __shfl_down_sync(0xffffffffu, 0.25 * i + 1e-300, delta);
}

// Threads 0-15 wait at a barrier the others never reach: a deadlock on a GPU.
extern "C" __global__ void t_barrier_some_threads(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Even and odd threads wait at different barriers.
extern "C" __global__ void t_barrier_two_sites(float* out) {
    if (threadIdx.x & 1) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// Half a warp shuffles with a full mask: the other half never comes.
extern "C" __global__ void t_shfl_half_warp(float* out) {
    float v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// What each block sees in shared memory before writing it, after a block before it wrote 1.
extern "C" __global__ void t_shared_starts_as_garbage(float* out) {
    __shared__ float s[4];
    const float seen = s[threadIdx.x & 3];
    __syncthreads();
    s[threadIdx.x & 3] = 1.0f;
    out[blockIdx.x * blockDim.x + threadIdx.x] = seen;
}

// out[i] = x[(i + 1) % n] through shared memory: with `barrier` 0 a race that some orders expose.
extern "C" __global__ void t_neighbour(const float* x, float* out, int barrier) {
    __shared__ float t[256];
    t[threadIdx.x] = x[threadIdx.x];
    if (barrier) __syncthreads();
    out[threadIdx.x] = t[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void t_read_at(const float* x, float* out, long long at) { out[threadIdx.x] = x[at]; }

extern "C" __global__ void t_index(int* out) {
    const long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
    const long long thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    out[block * blockDim.x * blockDim.y * blockDim.z + thread] = (int)(block * 10000 + thread);
}

extern "C" __global__ void t_conversions(const unsigned short* h, float* h_as_f32, const float* f, unsigned short* f_as_f16, unsigned short* f_as_bf16,
                                         long long n) {
    for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float out;
        unsigned short bits = h[i];
        asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(bits));
        h_as_f32[i] = out;
        const float v = f[i];
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
        f_as_f16[i] = bits;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(v));
        f_as_bf16[i] = bits;
    }
}

// Every lane shuffles with `mask`, whether or not it names the lane.
extern "C" __global__ void t_shfl_every_lane(float* out, unsigned int mask) {
    out[threadIdx.x] = __shfl_down_sync(mask, 1.0f * threadIdx.x, 1);
}
