// Row-wise and elementwise kernels of a Llama step: RMSNorm forward, input
// and weight gradients, RoPE (and its inverse, the VJP), and the gated
// activations SwiGLU / GeGLU-tanh forward and backward, on bf16 or (for
// full fine-tuning's f32 steps) f32 activations: every kernel is a template
// over the element type T with an entry point for each (`_f32` for f32).
// Math is f32 as in the CPU reference (kernels/src/{norm,rope,activation}.rs);
// bf16 outputs are rounded to nearest even.

// bf16_t, u32, ld / st and block_sum: common.cuh.

// One block per row of x[rows, h]: y = x * rsqrt(mean(x^2) + eps) * g,
// g = w or 1 + w.
// rsqrt(mean(x²) + eps) of the block's row of x (every thread gets it).
template <typename T>
__device__ float row_inv_rms(const T* x, size_t off, int h, float eps) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = ld(x, off + i);
        ss += v * v;
    }
    return rsqrtf(block_sum(ss) / (float)h + eps);
}

template <typename T>
__device__ void rms_norm_fwd_impl(const T* x, const T* w, T* y, int h, float eps, int unit_offset) {
    const size_t off = (size_t)blockIdx.x * h;
    float r = row_inv_rms(x, off, h, eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float g = ld(w, i) + (unit_offset ? 1.0f : 0.0f);
        st(y, off + i, ld(x, off + i) * r * g);
    }
}

// dx = r*dy*g - x * r^3 * sum(x*dy*g) / h, per row.
template <typename T>
__device__ void rms_norm_bwd_input_impl(const T* x, const T* w, const T* dy, T* dx, int h, float eps,
                                        int unit_offset) {
    const size_t off = (size_t)blockIdx.x * h;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = ld(x, off + i);
        float g = ld(w, i) + (unit_offset ? 1.0f : 0.0f);
        ss += v * v;
        dot += v * ld(dy, off + i) * g;
    }
    float r = rsqrtf(block_sum(ss) / (float)h + eps);
    float c = r * r * r * block_sum(dot) / (float)h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float g = ld(w, i) + (unit_offset ? 1.0f : 0.0f);
        st(dx, off + i, r * ld(dy, off + i) * g - ld(x, off + i) * c);
    }
}

// The norm weight's gradient dw[c] = Σ_rows dy·x·r (r = rsqrt(mean(x²) +
// eps) of each row; the unit-offset form has the same gradient), in two
// launches: rms_norm_inv_rows, a block per row, writes each row's r to
// r_rows; rms_norm_grad_weight then gives each block 32 columns, its warps
// every (warps)th row of them, and adds the warps' sums in order (the
// result depends on blockDim.x only).
template <typename T>
__device__ void rms_norm_inv_rows_impl(const T* x, float* r_rows, int h, float eps) {
    float r = row_inv_rms(x, (size_t)blockIdx.x * h, h, eps);
    if (threadIdx.x == 0) r_rows[blockIdx.x] = r;
}

template <typename T>
__device__ void rms_norm_grad_weight_impl(const T* x, const T* dy, const float* r_rows, T* dw, int rows, int h) {
    __shared__ float part[32][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    float acc = 0.0f;
    if (c < h)
        for (int r = warp; r < rows; r += warps) {
            const size_t k = (size_t)r * h + c;
            acc += ld(dy, k) * ld(x, k) * r_rows[r];
        }
    part[warp][lane] = acc;
    __syncthreads();
    if (warp == 0 && c < h) {
        float s = part[0][lane];
        for (int w = 1; w < warps; ++w) s += part[w][lane];
        st(dw, c, s);
    }
}

// Half-split RoPE on x[tokens, n_heads * 2 * half]: one thread per rotated
// pair. The angle is the f32 product position * inv_freq (as transformers).
template <typename T>
__device__ void rope_impl(const T* x, const int* positions, const float* inv_freq, T* y, int tokens, int n_heads,
                          int half, int inverse) {
    size_t n = (size_t)tokens * n_heads * half;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(k % half);
        size_t th = k / half;  // token * n_heads + head
        int t = (int)(th / n_heads);
        float a = (float)positions[t] * inv_freq[i];
        float c = cosf(a), s = inverse ? -sinf(a) : sinf(a);
        size_t base = th * 2 * half;
        float x1 = ld(x, base + i), x2 = ld(x, base + i + half);
        st(y, base + i, x1 * c - x2 * s);
        st(y, base + i + half, x2 * c + x1 * s);
    }
}

// act(g) and act'(g): kind 0 SiLU, 1 GELU (tanh approximation).
__device__ __forceinline__ void act(int kind, float g, float* a, float* da) {
    if (kind == 0) {
        float s = 1.0f / (1.0f + expf(-g));
        *a = g * s;
        *da = s * (1.0f + g * (1.0f - s));
    } else {
        const float k = 0.7978846f, c = 0.044715f;
        float t = tanhf(k * (g + c * g * g * g));
        float du = k * (1.0f + 3.0f * c * g * g);
        *a = 0.5f * g * (1.0f + t);
        *da = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * du;
    }
}

template <typename T>
__device__ void gated_act_fwd_impl(const T* gate, const T* up, T* y, size_t n, int kind) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a, da;
        act(kind, ld(gate, i), &a, &da);
        st(y, i, a * ld(up, i));
    }
}

template <typename T>
__device__ void gated_act_bwd_impl(const T* gate, const T* up, const T* dy, T* dgate, T* dup, size_t n, int kind) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float a, da;
        act(kind, ld(gate, i), &a, &da);
        float d = ld(dy, i);
        st(dgate, i, d * ld(up, i) * da);
        st(dup, i, d * a);
    }
}

// The entry points of one element type; `S` is the name suffix.
#define ROW_ENTRIES(S, T)                                                                                    \
    extern "C" __global__ void rms_norm_fwd##S(const T* x, const T* w, T* y, int h, float eps,              \
                                               int unit_offset) {                                           \
        rms_norm_fwd_impl(x, w, y, h, eps, unit_offset);                                                     \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_bwd_input##S(const T* x, const T* w, const T* dy, T* dx, int h,     \
                                                     float eps, int unit_offset) {                          \
        rms_norm_bwd_input_impl(x, w, dy, dx, h, eps, unit_offset);                                          \
    }                                                                                                        \
    extern "C" __global__ void rope##S(const T* x, const int* positions, const float* inv_freq, T* y,       \
                                       int tokens, int n_heads, int half, int inverse) {                    \
        rope_impl(x, positions, inv_freq, y, tokens, n_heads, half, inverse);                                \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_inv_rows##S(const T* x, float* r_rows, int h, float eps) {         \
        rms_norm_inv_rows_impl(x, r_rows, h, eps);                                                           \
    }                                                                                                        \
    extern "C" __global__ void rms_norm_grad_weight##S(const T* x, const T* dy, const float* r_rows, T* dw,  \
                                                       int rows, int h) {                                   \
        rms_norm_grad_weight_impl(x, dy, r_rows, dw, rows, h);                                               \
    }                                                                                                        \
    extern "C" __global__ void gated_act_fwd##S(const T* gate, const T* up, T* y, size_t n, int kind) {    \
        gated_act_fwd_impl(gate, up, y, n, kind);                                                            \
    }                                                                                                        \
    extern "C" __global__ void gated_act_bwd##S(const T* gate, const T* up, const T* dy, T* dgate, T* dup, \
                                                size_t n, int kind) {                                       \
        gated_act_bwd_impl(gate, up, dy, dgate, dup, n, kind);                                               \
    }
ROW_ENTRIES(, bf16_t)
ROW_ENTRIES(_f32, float)
