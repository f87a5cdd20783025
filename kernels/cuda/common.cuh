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

// Element k of an f32 or bf16 array as f32, and back (rounded to nearest
// even): kernels generic over their storage type.
__device__ __forceinline__ float ld(const float* p, size_t k) { return p[k]; }
__device__ __forceinline__ float ld(const bf16_t* p, size_t k) { return bf16_to_f32(p[k]); }
__device__ __forceinline__ void st(float* p, size_t k, float v) { p[k] = v; }
__device__ __forceinline__ void st(bf16_t* p, size_t k, float v) { p[k] = f32_to_bf16(v); }

// Whether dropout keeps element `index` for `seed`: splitmix64 of
// (seed << 32) ^ index, as elementwise.rs's dropout_keep.
__device__ __forceinline__ bool dropout_keep(u32 seed, size_t index, float p) {
    unsigned long long z = ((unsigned long long)seed << 32) ^ (unsigned long long)index ^ 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u = (float)(z >> 40) / 16777216.0f;
    return u >= p;
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

// Tensor-core, shared-memory and cp.async primitives (PTX). scripts/emulate_cuda.h
// defines GRAFT_EMULATE_PTX and gives scalar twins with the same per-lane
// semantics, so the kernels that use them also run on the CPU.
#ifndef GRAFT_EMULATE_PTX
// A kernel's dynamic shared memory, 1024-byte aligned (the NF4 GEMM's
// swizzled layouts assume whole 1024-byte lines).
#define DYNAMIC_SMEM(name) extern __shared__ __align__(1024) unsigned char name[]

// The shared-window address of a pointer into shared memory (what ldmatrix
// takes).
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// The dynamic shared memory the launch gave this block, in bytes.
__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}

// c[16x8] += a[16x16] · b[16x8], bf16 operands, f32 accumulators. With
// g = lane/4, t = lane%4: a0 = A(g, 2t..2t+1), a1 = A(g+8, 2t..), a2 =
// A(g, 2t+8..), a3 = A(g+8, 2t+8..); b0 = B(2t..2t+1, g), b1 = B(2t+8.., g);
// c0, c1 = C(g, 2t..2t+1), c2, c3 = C(g+8, 2t..2t+1); the lower index in
// the low half of a register.
__device__ __forceinline__ void mma_bf16(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ldmatrix: lane l gives the shared address of row l%8 of 8x8 matrix l/8
// (16 contiguous bytes); register i of lane l receives matrix i's elements
// (row l/4, columns 2(l%4), 2(l%4)+1) — with .trans, (rows 2(l%4), 2(l%4)+1,
// column l/4) — lower column (row) in the low half.
__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

// 16 bytes global -> shared, bypassing L1; the bytes past src_bytes (all 16
// when src_bytes is 0, and then nothing is read) are zero-filled.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Packs two floats as bf16x2, rounding to nearest even: `lo` in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}
#endif
