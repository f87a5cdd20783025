// Embedding lookup and its gradient (CPU reference: kernels/src/embedding.rs).
// The host has checked every id against the table's rows.

// y[t, :] = table[ids[t], :] on rows of h (bf16, or f32 for full
// fine-tuning: `embedding_fwd_f32`); a grid-stride loop over the n = tokens
// * h outputs. The id test only keeps a bad id (refused by the host) from
// reading out of bounds.
template <typename T>
__device__ void embedding_fwd_impl(const T* table, const int* ids, T* y, size_t n, int h, int vocab) {
    for (size_t k = (size_t)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int id = ids[k / h];
        if (id >= 0 && id < vocab) y[k] = table[(size_t)id * h + k % h];
    }
}
extern "C" __global__ void embedding_fwd(const bf16_t* table, const int* ids, bf16_t* y, size_t n, int h,
                                         int vocab) {
    embedding_fwd_impl(table, ids, y, n, h, vocab);
}
extern "C" __global__ void embedding_fwd_f32(const float* table, const int* ids, float* y, size_t n, int h,
                                             int vocab) {
    embedding_fwd_impl(table, ids, y, n, h, vocab);
}

// dtable[v, :] = sum of dy[t, :] (bf16, or f32: embedding_bwd_f32) over the
// tokens t with ids[t] = v, in f32,
// deterministic and without atomics: one block per distinct id, whose
// tokens are order[starts[b] .. starts[b + 1]] in increasing t (grouped on
// the host), summed in that order from 0 — the CPU's order, so the result
// is bit-identical. Rows of ids that occur nowhere are zeroed by the host
// (a memset) before this runs.
template <typename T>
__device__ void embedding_bwd_impl(const T* dy, const int* ids, const int* order, const int* starts, float* dtable,
                                   int h) {
    int s = starts[blockIdx.x], e = starts[blockIdx.x + 1];
    float* dst = dtable + (size_t)ids[order[s]] * h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float acc = 0.0f;
        for (int k = s; k < e; ++k) acc += ld(dy, (size_t)order[k] * h + j);
        dst[j] = acc;
    }
}
extern "C" __global__ void embedding_bwd(const bf16_t* dy, const int* ids, const int* order, const int* starts,
                                         float* dtable, int h) {
    embedding_bwd_impl(dy, ids, order, starts, dtable, h);
}
extern "C" __global__ void embedding_bwd_f32(const float* dy, const int* ids, const int* order,
                                             const int* starts, float* dtable, int h) {
    embedding_bwd_impl(dy, ids, order, starts, dtable, h);
}
