// Row-wise and elementwise kernels of a Llama step on bf16 activations:
// RMSNorm forward and input gradient, RoPE (and its inverse, the VJP), and
// the gated activations SwiGLU / GeGLU-tanh forward and backward. Math is
// f32 as in the CPU reference (kernels/src/{norm,rope,activation}.rs);
// outputs are rounded to bf16 (nearest even). bf16 is a raw 16-bit word.

// bf16_t, u32, the bf16 conversions and block_sum: common.cuh.

// One block per row of x[rows, h]: y = x * rsqrt(mean(x^2) + eps) * g,
// g = w or 1 + w.
extern "C" __global__ void rms_norm_fwd(const bf16_t* x, const bf16_t* w, bf16_t* y, int h,
                                        float eps, int unit_offset) {
    const bf16_t* xr = x + (size_t)blockIdx.x * h;
    bf16_t* yr = y + (size_t)blockIdx.x * h;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = bf16_to_f32(xr[i]);
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss) / (float)h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float g = bf16_to_f32(w[i]) + (unit_offset ? 1.0f : 0.0f);
        yr[i] = f32_to_bf16(bf16_to_f32(xr[i]) * r * g);
    }
}

// dx = r*dy*g - x * r^3 * sum(x*dy*g) / h, per row.
extern "C" __global__ void rms_norm_bwd_input(const bf16_t* x, const bf16_t* w, const bf16_t* dy,
                                              bf16_t* dx, int h, float eps, int unit_offset) {
    size_t off = (size_t)blockIdx.x * h;
    float ss = 0.0f, dot = 0.0f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = bf16_to_f32(x[off + i]);
        float g = bf16_to_f32(w[i]) + (unit_offset ? 1.0f : 0.0f);
        ss += v * v;
        dot += v * bf16_to_f32(dy[off + i]) * g;
    }
    float r = rsqrtf(block_sum(ss) / (float)h + eps);
    float c = r * r * r * block_sum(dot) / (float)h;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float g = bf16_to_f32(w[i]) + (unit_offset ? 1.0f : 0.0f);
        dx[off + i] = f32_to_bf16(r * bf16_to_f32(dy[off + i]) * g - bf16_to_f32(x[off + i]) * c);
    }
}

// Half-split RoPE on x[tokens, n_heads * 2 * half]: one thread per rotated
// pair. The angle is the f32 product position * inv_freq (as transformers).
extern "C" __global__ void rope(const bf16_t* x, const int* positions, const float* inv_freq,
                                bf16_t* y, int tokens, int n_heads, int half, int inverse) {
    size_t n = (size_t)tokens * n_heads * half;
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(k % half);
        size_t th = k / half;  // token * n_heads + head
        int t = (int)(th / n_heads);
        float a = (float)positions[t] * inv_freq[i];
        float c = cosf(a), s = inverse ? -sinf(a) : sinf(a);
        size_t base = th * 2 * half;
        float x1 = bf16_to_f32(x[base + i]), x2 = bf16_to_f32(x[base + i + half]);
        y[base + i] = f32_to_bf16(x1 * c - x2 * s);
        y[base + i + half] = f32_to_bf16(x2 * c + x1 * s);
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

extern "C" __global__ void gated_act_fwd(const bf16_t* gate, const bf16_t* up, bf16_t* y, size_t n,
                                         int kind) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float a, da;
        act(kind, bf16_to_f32(gate[i]), &a, &da);
        y[i] = f32_to_bf16(a * bf16_to_f32(up[i]));
    }
}

extern "C" __global__ void gated_act_bwd(const bf16_t* gate, const bf16_t* up, const bf16_t* dy,
                                         bf16_t* dgate, bf16_t* dup, size_t n, int kind) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float a, da;
        act(kind, bf16_to_f32(gate[i]), &a, &da);
        float d = bf16_to_f32(dy[i]);
        dgate[i] = f32_to_bf16(d * bf16_to_f32(up[i]) * da);
        dup[i] = f32_to_bf16(d * a);
    }
}
