// DoRA's two kernels of its own (kernels/src/dora.rs is the reference):
// the detached weight norm per output row, and the epilogue that scales
// base + LoRA by magnitude over norm. The column-wise multiplies and sums of
// its backward pass are elementwise.cu's.

// bf16_t, ld/st and block_sum: common.cuh.

// Output rows per block of dora_inv_norm: each of A's columns is read once
// for that many rows.
#define DORA_ROWS 8
// The largest rank dora_inv_norm takes (B's rows sit in shared memory).
#define DORA_MAX_RANK 256

// y[o] = 1 / ‖w[o, :] + s·(b·a)[o, :]‖₂ for o in this block's DORA_ROWS
// rows, with a [r, in], b [out, r] f32 and w [out, in] (f32 or bf16: an NF4
// weight is dequantized to bf16 first). (b·a)[o, i] is summed over k in
// order, then scaled and added to w, each a separate rounding as on the
// CPU (NVRTC runs with --fmad=false); the squares are summed per thread,
// then over the block.
template <typename W>
__device__ void dora_inv_norm_impl(const float* a, const float* b, const W* w, float s, int out,
                                   int in, int r, float* y) {
    __shared__ float bs[DORA_ROWS * DORA_MAX_RANK];
    const int o0 = blockIdx.x * DORA_ROWS;
    const int rows = min(DORA_ROWS, out - o0);
    for (int t = threadIdx.x; t < rows * r; t += blockDim.x) bs[t] = b[(size_t)o0 * r + t];
    __syncthreads();
    float sq[DORA_ROWS];
#pragma unroll
    for (int j = 0; j < DORA_ROWS; ++j) sq[j] = 0.0f;
    for (int i = threadIdx.x; i < in; i += blockDim.x) {
        float ba[DORA_ROWS];
#pragma unroll
        for (int j = 0; j < DORA_ROWS; ++j) ba[j] = 0.0f;
        for (int k = 0; k < r; ++k) {
            const float ak = a[(size_t)k * in + i];
#pragma unroll
            for (int j = 0; j < DORA_ROWS; ++j)
                if (j < rows) ba[j] += bs[j * r + k] * ak;
        }
#pragma unroll
        for (int j = 0; j < DORA_ROWS; ++j)
            if (j < rows) {
                const float v = ld(w, (size_t)(o0 + j) * in + i) + s * ba[j];
                sq[j] += v * v;
            }
    }
#pragma unroll
    for (int j = 0; j < DORA_ROWS; ++j) {
        const float total = block_sum(sq[j]);  // every thread: it holds barriers
        if (threadIdx.x == 0 && j < rows) y[o0 + j] = 1.0f / sqrtf(total);
    }
}
extern "C" __global__ void dora_inv_norm_f32(const float* a, const float* b, const float* w, float s,
                                             int out, int in, int r, float* y) {
    dora_inv_norm_impl(a, b, w, s, out, in, r, y);
}
extern "C" __global__ void dora_inv_norm_bf16(const float* a, const float* b, const bf16_t* w, float s,
                                              int out, int in, int r, float* y) {
    dora_inv_norm_impl(a, b, w, s, out, in, r, y);
}

// y[m, n] = scale[n]·(base[m, n] + lora[m, n]): the sum and the product in
// f32, rounded once to y's type (base's); grid-stride over the elements.
template <typename T>
__device__ void dora_combine_impl(const T* base, const float* lora, const float* scale, T* y, size_t n,
                                  size_t cols) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x)
        st(y, k, (ld(base, k) + lora[k]) * scale[k % cols]);
}
extern "C" __global__ void dora_combine_f32(const float* base, const float* lora, const float* scale, float* y,
                                            size_t n, size_t cols) {
    dora_combine_impl(base, lora, scale, y, n, cols);
}
extern "C" __global__ void dora_combine_bf16(const bf16_t* base, const float* lora, const float* scale,
                                             bf16_t* y, size_t n, size_t cols) {
    dora_combine_impl(base, lora, scale, y, n, cols);
}
