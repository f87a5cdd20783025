// Prepended to every source under kernels/cuda/ before NVRTC compiles it
// (kernels/src/cuda/mod.rs): bf16 as raw 16-bit words and its conversions,
// bit-identical to the CPU's half::bf16.

typedef unsigned short bf16_t;
typedef unsigned int u32;

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even, as the CPU's half::bf16::from_f32 (NaN kept quiet).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Reductions over a block (blockDim.x a multiple of 32, at most 1024). Every
// thread of the block must call them (they hold barriers) and every thread
// gets the result. The order of additions depends on blockDim.x only, so a
// result is the same on every run.
template <typename T, typename Op>
__device__ T block_reduce(T v, T identity, Op op) {
    __shared__ T part[32];
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = (threadIdx.x < warps) ? part[threadIdx.x] : identity;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) part[0] = v;
    }
    __syncthreads();
    T r = part[0];
    __syncthreads();  // part is reused by the next call
    return r;
}

struct SumOp {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Sum over the block, in f32 or f64.
template <typename T>
__device__ T block_sum(T v) { return block_reduce(v, (T)0, SumOp()); }

// Maximum over the block (a NaN loses to any number, as Rust's f32::max).
__device__ __forceinline__ float block_max(float v) {
    return block_reduce(v, -__int_as_float(0x7f800000), MaxOp());
}
