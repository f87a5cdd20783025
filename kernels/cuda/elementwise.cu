// Elementwise kernels of a training plan's glue: casts between f32 and
// bf16, add, multiply, scale by a constant or a device scalar, a per-column
// multiply, the sum over rows, fill, and dropout, for f32 and bf16.
// Math is f32 as in the CPU reference (kernels/src/elementwise.rs), outputs
// rounded to nearest even; dropout draws the same mask bit for bit
// (`dropout_keep`). Every kernel is a grid-stride loop over n elements; an
// output may alias an input of its own type (each element is read before it
// is written, by the same thread); a cast's may not.

// bf16_t, u32, the bf16 conversions, ld/st and dropout_keep: common.cuh.

#define GRID_STRIDE(k, n) \
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < (n); k += (size_t)gridDim.x * blockDim.x)


template <typename S, typename D>
__device__ void cast_impl(const S* x, D* y, size_t n) {
    GRID_STRIDE(k, n) st(y, k, ld(x, k));
}
extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, size_t n) { cast_impl(x, y, n); }
extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, size_t n) { cast_impl(x, y, n); }

template <typename T>
__device__ void add_impl(const T* a, const T* b, T* y, size_t n) {
    GRID_STRIDE(k, n) st(y, k, ld(a, k) + ld(b, k));
}
extern "C" __global__ void add_f32(const float* a, const float* b, float* y, size_t n) { add_impl(a, b, y, n); }
extern "C" __global__ void add_bf16(const bf16_t* a, const bf16_t* b, bf16_t* y, size_t n) { add_impl(a, b, y, n); }

template <typename T>
__device__ void mul_impl(const T* a, const T* b, T* y, size_t n) {
    GRID_STRIDE(k, n) st(y, k, ld(a, k) * ld(b, k));
}
extern "C" __global__ void mul_f32(const float* a, const float* b, float* y, size_t n) { mul_impl(a, b, y, n); }
extern "C" __global__ void mul_bf16(const bf16_t* a, const bf16_t* b, bf16_t* y, size_t n) { mul_impl(a, b, y, n); }

// y = x * c.
template <typename T>
__device__ void scale_impl(const T* x, float c, T* y, size_t n) {
    GRID_STRIDE(k, n) st(y, k, ld(x, k) * c);
}
extern "C" __global__ void scale_f32(const float* x, float c, float* y, size_t n) { scale_impl(x, c, y, n); }
extern "C" __global__ void scale_bf16(const bf16_t* x, float c, bf16_t* y, size_t n) { scale_impl(x, c, y, n); }

// y = x * s[0], the scalar read on the device (a loss scale computed there).
template <typename T>
__device__ void scale_by_impl(const T* x, const float* s, T* y, size_t n) {
    scale_impl(x, s[0], y, n);
}
extern "C" __global__ void scale_by_f32(const float* x, const float* s, float* y, size_t n) { scale_by_impl(x, s, y, n); }
extern "C" __global__ void scale_by_bf16(const bf16_t* x, const float* s, bf16_t* y, size_t n) { scale_by_impl(x, s, y, n); }

// y[m, c] = x[m, c] * v[c] (x and y n elements of rows of `cols`); v of
// x's type or f32 (DoRA's column scale of a bf16 product).
template <typename T, typename V>
__device__ void mul_cols_impl(const T* x, const V* v, T* y, size_t n, size_t cols) {
    GRID_STRIDE(k, n) st(y, k, ld(x, k) * ld(v, k % cols));
}
#define MUL_COLS(name, T, V) \
    extern "C" __global__ void name(const T* x, const V* v, T* y, size_t n, size_t cols) { mul_cols_impl(x, v, y, n, cols); }
MUL_COLS(mul_cols_f32_f32, float, float)
MUL_COLS(mul_cols_f32_bf16, float, bf16_t)
MUL_COLS(mul_cols_bf16_f32, bf16_t, float)
MUL_COLS(mul_cols_bf16_bf16, bf16_t, bf16_t)

// y[c] = the sum over the rows of x[rows, cols], in f32. A block takes 32
// columns: each of its warps sums every (warps)th row of them, then the
// first warp adds the warps' partial sums in order, so the result depends on
// blockDim.x only. One block per 32 columns.
template <typename T>
__device__ void sum_rows_impl(const T* x, T* y, int rows, int cols) {
    __shared__ float part[32][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    float acc = 0.0f;
    if (c < cols)
        for (int r = warp; r < rows; r += warps) acc += ld(x, (size_t)r * cols + c);
    part[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && c < cols) {
        float s = part[0][lane];
        for (int w = 1; w < warps; ++w) s += part[w][lane];
        st(y, c, s);
    }
}
extern "C" __global__ void sum_rows_f32(const float* x, float* y, int rows, int cols) { sum_rows_impl(x, y, rows, cols); }
extern "C" __global__ void sum_rows_bf16(const bf16_t* x, bf16_t* y, int rows, int cols) { sum_rows_impl(x, y, rows, cols); }

extern "C" __global__ void fill_f32(float* y, float v, size_t n) { GRID_STRIDE(k, n) y[k] = v; }
extern "C" __global__ void fill_bf16(bf16_t* y, float v, size_t n) { GRID_STRIDE(k, n) st(y, k, v); }

// y = x * mask / (1 - p), the seed read on the device.
template <typename T>
__device__ void dropout_impl(const T* x, const u32* seed, float p, T* y, size_t n) {
    u32 s = seed[0];
    float keep_scale = 1.0f / (1.0f - p);
    GRID_STRIDE(k, n) st(y, k, dropout_keep(s, k, p) ? ld(x, k) * keep_scale : 0.0f);
}
extern "C" __global__ void dropout_f32(const float* x, const u32* seed, float p, float* y, size_t n) {
    dropout_impl(x, seed, p, y, n);
}
extern "C" __global__ void dropout_bf16(const bf16_t* x, const u32* seed, float p, bf16_t* y, size_t n) {
    dropout_impl(x, seed, p, y, n);
}
