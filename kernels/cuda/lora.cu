// LoRA's A-side product at rank 16, y[m, 16] = alpha·x[m, k]·w[16, k]ᵀ
// (+ beta·y), bf16 x and w, f32 sums and y: the skinny product cuBLAS
// runs poorly (a tile shape for wide outputs; the 7B step spent about
// 29 µs a call on it, where reading x takes about 6 µs). An experiment
// beside cuBLAS in gpu-bench until it is measured.
//
// A block of 8 warps takes 16 rows of x; warp w the k-blocks of 32 at
// w, w + 8, .. . Each lane loads 16 bytes (8 values of k) of two rows of x
// and of two rows of w, and feeds them to the tensor cores (mma m16n8k16)
// as two k-steps: which k sits in which slot of an mma does not change the
// sum, as long as x and w use the same slots, so the loads are whole
// 16-byte runs instead of the fragments' scattered pairs. The 8 warps'
// 16x16 partial sums are added in warp order through shared memory (the
// result is the same on every run). k is a multiple of 8 (each 16-byte run
// is all inside k or all past it); rows past m are zeros and not stored.
#define LORA16_WARPS 8

extern "C" __global__ void __launch_bounds__(LORA16_WARPS * 32)
    lora16_xwt(const bf16_t* x, const bf16_t* w, float* y, int m, int k, float alpha, float beta) {
    __shared__ float part[LORA16_WARPS][16][16];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const long long r0 = (long long)blockIdx.x * 16;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    for (int k0 = warp * 32; k0 < k; k0 += LORA16_WARPS * 32) {
        const int kk = k0 + 8 * t;
        const bool in_k = kk < k;
        const uint4 xa = in_k && r0 + g < m ? *(const uint4*)(x + (r0 + g) * k + kk) : zero;
        const uint4 xb = in_k && r0 + g + 8 < m ? *(const uint4*)(x + (r0 + g + 8) * k + kk) : zero;
        const u32 a_lo[4] = {xa.x, xb.x, xa.y, xb.y}, a_hi[4] = {xa.z, xb.z, xa.w, xb.w};
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const uint4 wv = in_k ? *(const uint4*)(w + (long long)(8 * j + g) * k + kk) : zero;
            mma_bf16(acc[j], a_lo, wv.x, wv.y);
            mma_bf16(acc[j], a_hi, wv.z, wv.w);
        }
    }
#pragma unroll
    for (int j = 0; j < 2; j++) {
        part[warp][g][8 * j + 2 * t] = acc[j][0];
        part[warp][g][8 * j + 2 * t + 1] = acc[j][1];
        part[warp][g + 8][8 * j + 2 * t] = acc[j][2];
        part[warp][g + 8][8 * j + 2 * t + 1] = acc[j][3];
    }
    __syncthreads();
    // The block's 256 threads: one output each.
    const int row = threadIdx.x >> 4, col = threadIdx.x & 15;
    float s = 0.f;
    for (int i = 0; i < LORA16_WARPS; i++) s += part[i][row][col];
    if (r0 + row < m) {
        float* o = y + (r0 + row) * 16 + col;
        *o = beta != 0.f ? alpha * s + beta * *o : alpha * s;
    }
}
