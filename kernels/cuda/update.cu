// Optimizer updates on f32 parameters, written in place: AdamW (the CPU's
// kernels/src/update.rs adamw_update, which engine/src/optim.rs runs) and
// LOMO's fused SGD (sgd_update there); and the gradient handling around an
// AdamW step (the trainer's accumulation over micro-batches, the global
// norm and clip_grad_norm's scaling, the value clamp). Each operation is the CPU's, in the
// same order, with fused multiply-adds exactly where the CPU has mul_add
// (NVRTC runs with --fmad=false, so nothing else is contracted): the
// results are meant to be bit-identical.

// ATen's vectorised lerp: a + w*(b - a), anchored at the nearer end.
__device__ __forceinline__ float lerp_aten(float a, float b, float w) {
    return fabsf(w) < 0.5f ? fmaf(b - a, w, a) : fmaf(b - a, w - 1.0f, b);
}

// One AdamW step over n elements (grid-stride); the scalars are the host's
// AdamWStep.
extern "C" __global__ void adamw_update(float* p, const float* g, float* m, float* v, size_t n,
                                        float decay, float w1, float b2, float w2, float bc2_sqrt,
                                        float eps, float neg_step) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i];
        float pi = p[i] * decay;
        float mi = lerp_aten(m[i], gi, w1);
        float vi = fmaf(w2 * gi, gi, v[i] * b2);
        float denom = sqrtf(vi) / bc2_sqrt + eps;
        p[i] = pi + (neg_step * mi) / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

// One SGD step over n elements (grid-stride): clamp to +-clip (if clip > 0;
// a NaN stays NaN, as f32::clamp), times coef, plus wd*p, then p -= lr*d.
// lr and coef are device scalars (LOMO's clipping coefficient comes from a
// norm measured on the device). Each block also writes the f64 sum of the
// squares of its raw gradients to partials[blockIdx.x]; sum_partials adds
// them up.
extern "C" __global__ void sgd_update(float* p, const float* g, const float* lr,
                                      const float* coef, size_t n, float wd, float clip,
                                      double* partials) {
    float neg_lr = -lr[0], cf = coef[0];
    double sq = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i];
        sq += (double)gi * (double)gi;
        if (clip > 0.0f) gi = gi < -clip ? -clip : (gi > clip ? clip : gi);
        float d = gi * cf;
        if (wd != 0.0f) d = fmaf(p[i], wd, d);
        p[i] = fmaf(d, neg_lr, p[i]);
    }
    sq = block_sum(sq);
    if (threadIdx.x == 0) partials[blockIdx.x] = sq;
}

// One block: out[0] = the sum of partials[0..n] (f64), as f32 or f64.
template <typename T>
__device__ void sum_partials_impl(const double* partials, int n, T* out) {
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += partials[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = (T)s;
}
extern "C" __global__ void sum_partials(const double* partials, int n, float* out) {
    sum_partials_impl(partials, n, out);
}
extern "C" __global__ void sum_partials_f64(const double* partials, int n, double* out) {
    sum_partials_impl(partials, n, out);
}

// Each block writes the f64 sum of the squares of its grid-stride elements
// to partials[blockIdx.x] (sum_partials_f64 adds them up).
extern "C" __global__ void sum_squares(const float* g, size_t n, double* partials) {
    double sq = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        sq += (double)g[i] * (double)g[i];
    sq = block_sum(sq);
    if (threadIdx.x == 0) partials[blockIdx.x] = sq;
}

// acc = w*g (first != 0) or acc + w*g: one micro-batch's gradient into the
// step's, weighted by its share of the counted tokens.
extern "C" __global__ void grad_accumulate(float* acc, const float* g, float w, size_t n, int first) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        acc[i] = first ? w * g[i] : acc[i] + w * g[i];
}

// g = g*coef where coef < 1 (clip_grad_norm), then clamped to +-max_value
// where that is positive (a NaN stays NaN, as f32::clamp).
extern "C" __global__ void grad_clip(float* g, size_t n, float coef, float max_value) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = g[i];
        if (coef < 1.0f) x *= coef;
        if (max_value > 0.0f) x = x < -max_value ? -max_value : (x > max_value ? max_value : x);
        g[i] = x;
    }
}
