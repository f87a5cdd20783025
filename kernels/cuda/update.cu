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
        if (neg_lr == 0.0f) continue;  // the measuring pass writes nothing
        if (clip > 0.0f) gi = gi < -clip ? -clip : (gi > clip ? clip : gi);
        float d = gi * cf;
        if (wd != 0.0f) d = fmaf(p[i], wd, d);
        p[i] = fmaf(d, neg_lr, p[i]);
    }
    sq = block_sum(sq);
    if (threadIdx.x == 0) partials[blockIdx.x] = sq;
}

// AdaLomo (kernels/src/update.rs adalomo_update) on an f32 parameter p, in
// place, with its second moment: factored (row[rows], col[cols]) for a
// matrix, else full (v[n] in row). The launches, in order: sum_squares and
// sum_partials (the raw gradient's squared norm, always); adalomo_rows and
// adalomo_cols (factored) or adalomo_vector; adalomo_row_mean (factored);
// adalomo_norms (per-block f64 sums of u^2 and p^2); adalomo_finish (the
// update's scale and effective learning rate into scal); adalomo_apply.
// Sums run in f64 in a fixed order, so a step is the same on every run; the
// CPU sums in f32 in element order, so the two agree to rounding, not bit
// for bit. Every adalomo_* launch returns at once when lr[0] == 0 (LOMO's
// measuring pass writes nothing). lr, coef and the step number t are
// device scalars.

// The gradient as the update sees it: clamped to +-clip (if clip > 0), times coef.
__device__ __forceinline__ float adalomo_grad(float g, float coef, float clip) {
    if (clip > 0.0f) g = g < -clip ? -clip : (g > clip ? clip : g);
    return g * coef;
}

// The second moment's decay 1 - t^decay_rate at step t (the host's t as u64).
__device__ __forceinline__ float adalomo_beta(const float* step, float decay_rate) {
    return 1.0f - powf(truncf(fmaxf(step[0], 0.0f)), decay_rate);
}

// Factored: row[r] = beta*row[r] + (1-beta)*mean_c(g[r,c]^2 + eps1), a block per row.
extern "C" __global__ void adalomo_rows(const float* g, float* row, int rows, int cols,
                                        const float* lr, const float* coef, const float* step,
                                        float clip, float eps1, float decay_rate) {
    if (lr[0] == 0.0f) return;
    float cf = coef[0], beta = adalomo_beta(step, decay_rate);
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* gr = g + (size_t)r * cols;
        double s = 0.0;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            float x = adalomo_grad(gr[c], cf, clip);
            s += (double)(x * x + eps1);
        }
        s = block_sum(s);
        if (threadIdx.x == 0) row[r] = row[r] * beta + (float)(s / cols) * (1.0f - beta);
    }
}

// Factored: col[c] = beta*col[c] + (1-beta)*mean_r(g[r,c]^2 + eps1). A block
// of up to 1024 threads takes 32 columns: each warp reads 32 adjacent values
// of every (warps)th row, and the warps' sums are added in warp order.
extern "C" __global__ void adalomo_cols(const float* g, float* col, int rows, int cols,
                                        const float* lr, const float* coef, const float* step,
                                        float clip, float eps1, float decay_rate) {
    if (lr[0] == 0.0f) return;
    __shared__ double part[32][32];
    float cf = coef[0], beta = adalomo_beta(step, decay_rate);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int c0 = blockIdx.x * 32; c0 < cols; c0 += gridDim.x * 32) {
        int c = c0 + lane;
        double s = 0.0;
        if (c < cols)
            for (int r = warp; r < rows; r += warps) {
                float x = adalomo_grad(g[(size_t)r * cols + c], cf, clip);
                s += (double)(x * x + eps1);
            }
        part[warp][lane] = s;
        __syncthreads();
        if (warp == 0 && c < cols) {
            double t = 0.0;
            for (int w = 0; w < warps; ++w) t += part[w][lane];
            col[c] = col[c] * beta + (float)(t / rows) * (1.0f - beta);
        }
        __syncthreads();
    }
}

// Full: v[i] = beta*v[i] + (1-beta)*(g[i]^2 + eps1).
extern "C" __global__ void adalomo_vector(const float* g, float* v, size_t n, const float* lr,
                                          const float* coef, const float* step, float clip,
                                          float eps1, float decay_rate) {
    if (lr[0] == 0.0f) return;
    float cf = coef[0], beta = adalomo_beta(step, decay_rate);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = adalomo_grad(g[i], cf, clip);
        v[i] = v[i] * beta + (x * x + eps1) * (1.0f - beta);
    }
}

// Factored: scal[0] = the mean of row[0..rows] (one block).
extern "C" __global__ void adalomo_row_mean(const float* row, int rows, const float* lr,
                                            float* scal) {
    if (lr[0] == 0.0f) return;
    double s = 0.0;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) s += row[r];
    s = block_sum(s);
    if (threadIdx.x == 0) scal[0] = (float)(s / rows);
}

// Element i of the normalised update u = g / sqrt(v): v is row[r]*col[c] /
// mean(row) when factored (cols > 0), else row[i].
__device__ __forceinline__ float adalomo_u(const float* g, const float* row, const float* col,
                                           size_t i, size_t cols, float row_mean, float cf,
                                           float clip) {
    float x = adalomo_grad(g[i], cf, clip);
    if (cols == 0) return x / sqrtf(row[i]);
    float rf = 1.0f / sqrtf(row[i / cols] / row_mean);
    return rf * (1.0f / sqrtf(col[i % cols])) * x;
}

// Each block's f64 sums of u^2 and p^2 into partials[blockIdx.x] and
// partials[gridDim.x + blockIdx.x]. cols = 0: full second moment.
extern "C" __global__ void adalomo_norms(const float* p, const float* g, const float* row,
                                         const float* col, size_t n, size_t cols,
                                         const float* lr, const float* coef, float clip,
                                         const float* scal, double* partials) {
    if (lr[0] == 0.0f) return;
    float cf = coef[0], row_mean = cols ? scal[0] : 1.0f;
    double su = 0.0, sp = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float u = adalomo_u(g, row, col, i, cols, row_mean, cf, clip);
        su += (double)u * (double)u;
        sp += (double)p[i] * (double)p[i];
    }
    su = block_sum(su);
    sp = block_sum(sp);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = su;
        partials[gridDim.x + blockIdx.x] = sp;
    }
}

// One block: from the `blocks` pairs of partial sums over n elements,
// scal[1] = lr * max(eps2, RMS(p)) and scal[2] = max(RMS(u) / clip_threshold, 1).
extern "C" __global__ void adalomo_finish(const double* partials, int blocks, size_t n,
                                          const float* lr, float eps2, float clip_threshold,
                                          float* scal) {
    if (lr[0] == 0.0f) return;
    double su = 0.0, sp = 0.0;
    for (int b = threadIdx.x; b < blocks; b += blockDim.x) {
        su += partials[b];
        sp += partials[blocks + b];
    }
    su = block_sum(su);
    sp = block_sum(sp);
    if (threadIdx.x == 0) {
        float rms_u = (float)sqrt(su / (double)(n ? n : 1));
        float rms_p = (float)sqrt(sp / (double)(n ? n : 1));
        scal[1] = lr[0] * fmaxf(eps2, rms_p);
        scal[2] = fmaxf(rms_u / clip_threshold, 1.0f);
    }
}

// p = p*(1 - lr'*wd) - lr'*(u/scale), lr' and scale from adalomo_finish.
extern "C" __global__ void adalomo_apply(float* p, const float* g, const float* row,
                                         const float* col, size_t n, size_t cols,
                                         const float* lr, const float* coef, float clip, float wd,
                                         const float* scal) {
    if (lr[0] == 0.0f) return;
    float cf = coef[0], row_mean = cols ? scal[0] : 1.0f, lr_eff = scal[1], scale = scal[2];
    float decay = 1.0f - lr_eff * wd;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float u = adalomo_u(g, row, col, i, cols, row_mean, cf, clip);
        float pi = wd != 0.0f ? p[i] * decay : p[i];
        p[i] = pi - lr_eff * (u / scale);
    }
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
