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
