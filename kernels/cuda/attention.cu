// Causal self-attention with GQA, packed segments and an optional sliding
// window, forward and backward, flash-attention-2 style: nothing [t, t] is
// stored, every product runs on tensor cores (mma.sync m16n8k16, bf16
// operands, f32 accumulation), softmax statistics are f32. The CPU twin is
// kernels/src/attention.rs (`attention`, `attention_grad`), whose meaning
// this follows:
//   q[t, n_heads*D], k/v[t, n_kv_heads*D] bf16; query head h reads kv head
//   h / group. Query i sees keys first_key(i) ..= i, where first_key(i) is
//   the start of i's segment run (run_start[i], computed and checked on the
//   host) or, with a window w > 0, i + 1 - w if later. Scores are
//   scale·q·k; lse[t, n_heads] is the f32 log-sum-exp of the scaled scores.
//   Probabilities and score gradients are rounded to bf16 for the products
//   that take them, as the CPU does.
//
// first_key is non-decreasing in i, so a block of queries sees keys from
// first_key(first query) to its last query, and a block of keys is seen by
// the queries from its first key to the first query whose first_key passes
// the block: the kernels visit exactly the tiles that intersect the visible
// band and mask inside them.
//
// Tiles come from global memory through cp.async, issued a step ahead so
// they land while the tensor cores work on the previous ones; scores are
// kept in log2 units (scale·log2 e folded in) so each probability is one
// exp2; only tiles the band's edge crosses are masked.
//
// Kernels (4 warps of 32; every warp owns 16 rows of the block):
//   attn_fwd_D:   one block per (64 queries, head): loops over 64-key tiles
//                 with an online softmax; writes out and lse.
//   attn_delta:   Δ[t, n_heads] = rowsum(dout ⊙ out) in f32, a warp per row
//                 (attn_delta_f32 for f32 rows).
//   attn_dkdv_D:  one block per (64 keys, kv head): loops over the heads of
//                 its group and the 32-query steps that see its keys (the
//                 next step's queries double-buffered), accumulating dk, dv
//                 in registers (no atomics: one block alone owns each key
//                 row, so results are deterministic).
//   attn_dq_D:    one block per (64 queries, head): loops over key tiles as
//                 the forward, accumulating dq in registers.
//   attn_cached_D: generation's step: queries at positions start.. against
//                 the key/value cache (rows 0..start) and the new rows; one
//                 block per (query, head), a key per warp at a time on the
//                 CUDA cores (memory-bound: one query row per key row).
//   attn_f32_{fwd,dq,dkdv}_D: the same passes on f32 rows (full fine-tuning
//                 computes in f32), on the CUDA cores: a block per query row
//                 (fwd, dq) or key row (dkdv) and head.
// D (head dim) is 32, 64 or 128. Tiles live in dynamic shared memory, rows
// padded by 8 elements (16 bytes) so the 8 rows an ldmatrix reads fall in 8
// distinct bank groups (row stride 5, 9 or 17 chunks of 16 bytes, odd): no
// conflicts. The launch passes attn_smem_bytes(kernel, D) (mirrored in
// kernels/src/cuda/attention.rs); a kernel given less traps.

#define ATT_THREADS 128
#define ATT_ROWS 64  // queries per block (fwd, dq), keys per tile and per dkdv block
#define ATT_BQ 32    // queries per step of the dkdv kernel (keeps it under 255 registers)
#define ATT_PAD 8

#define NEG_INF (-__int_as_float(0x7f800000))

enum { ATT_FWD = 0, ATT_DQ = 1, ATT_DKDV = 2 };

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Dynamic shared memory of each kernel: bf16 tiles of (D + ATT_PAD)-wide
// rows — fwd: q, k, v; dq: q, dout, k, v; dkdv: k, v and two buffers of
// 32 rows of q and dout, plus two of lse, Δ and first_key of those 32
// queries.
__device__ constexpr int attn_smem_bytes(int kernel, int d) {
    return kernel == ATT_FWD  ? 3 * ATT_ROWS * (d + ATT_PAD) * 2
         : kernel == ATT_DQ   ? 4 * ATT_ROWS * (d + ATT_PAD) * 2
                              : (2 * ATT_ROWS + 4 * ATT_BQ) * (d + ATT_PAD) * 2 + 6 * ATT_BQ * 4;
}

// The first key query i may see.
__device__ __forceinline__ int first_key(const int* run_start, int i, int window) {
    const int s = run_start[i];
    return window > 0 && i + 1 - window > s ? i + 1 - window : s;
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

// Rows row0 .. row0+n-1 of a row-major bf16 matrix `width` wide, columns
// col0 .. col0+D-1, into a shared [n][D + ATT_PAD] tile, 16 bytes at a
// time through cp.async (width and col0 are multiples of 8): the caller
// commits the group and waits for it. Rows at or past t are zeros, so that
// products over padded rows stay finite (and then masked).
template <int D>
__device__ __forceinline__ void load_rows(bf16_t* dst, const bf16_t* src, int row0, int n, int t,
                                          long long width, int col0) {
    constexpr int CH = D / 8;
    for (int c = threadIdx.x; c < n * CH; c += ATT_THREADS) {
        const int r = c / CH, cc = c % CH;
        const bool ok = row0 + r < t;
        cp_async16(smem_u32(dst + r * (D + ATT_PAD) + cc * 8),
                   ok ? src + (row0 + r) * width + col0 + cc * 8 : src, ok ? 16u : 0u);
    }
}

// f(j, e, r, c) over a warp's 16 x 8NT accumulator tile: entry (j, e) is
// the thread's row r = e >> 1 (of its two), column c = 8j + 2tq + (e & 1).
template <int NT, typename F>
__device__ __forceinline__ void each_entry(F f) {
    const int tq = threadIdx.x & 3;
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) f(j, e, e >> 1, 8 * j + 2 * tq + (e & 1));
}

// acc[16 x 8NT] += A[16 x KD] · B[8NT x KD]ᵀ for one warp: A's 16 rows and
// B's 8NT rows in shared memory, row-major with row strides sa, sb.
//   A (ldmatrix.x4): lane l addresses row l & 15, columns 16kk + 8(l >> 4):
//     matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
//     are a0..a3.
//   B (ldmatrix.x4, two n tiles): lane l addresses row 16jp + (l & 7) +
//     8(l >> 4), columns 16kk + 8((l >> 3) & 1): matrices (n 0-7, k 0-7),
//     (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) are b0, b1 of n
//     tile 2jp and b0, b1 of n tile 2jp+1 (lane l gets B row l/4 = n g, k
//     2t..2t+1: the mma's b layout).
template <int NT, int KD>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const bf16_t* a, int sa, const bf16_t* b,
                                        int sb) {
    const int lane = threadIdx.x & 31;
    const bf16_t* ap = a + (lane & 15) * sa + 8 * (lane >> 4);
    const bf16_t* bp = b + ((lane & 7) + 8 * (lane >> 4)) * sb + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int kk = 0; kk < KD / 16; kk++) {
        u32 af[4];
        ldsm_x4(smem_u32(ap + 16 * kk), af[0], af[1], af[2], af[3]);
#pragma unroll
        for (int jp = 0; jp < NT / 2; jp++) {
            u32 b0, b1, b2, b3;
            ldsm_x4(smem_u32(bp + 16 * jp * sb + 16 * kk), b0, b1, b2, b3);
            mma_bf16(acc[2 * jp], af, b0, b1);
            mma_bf16(acc[2 * jp + 1], af, b2, b3);
        }
    }
}

// acc[16 x 8NT] += P[16 x 16KS] · B[16KS x 8NT] for one warp: P in A
// fragments (registers, from c_to_a), B row-major in shared memory (row
// stride sb), read with ldmatrix.x4.trans: lane l addresses row 16kk +
// (l & 15), columns 16jp + 8(l >> 4); matrices (k 0-7, n 0-7), (k 8-15,
// n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) transposed are b0, b1 of n tile
// 2jp and b0, b1 of n tile 2jp+1.
template <int NT, int KS>
__device__ __forceinline__ void mma_ab(float (*acc)[4], const u32 (*p)[4], const bf16_t* b, int sb) {
    const int lane = threadIdx.x & 31;
    const bf16_t* bp = b + (lane & 15) * sb + 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < KS; kk++)
#pragma unroll
        for (int jp = 0; jp < NT / 2; jp++) {
            u32 b0, b1, b2, b3;
            ldsm_x4_trans(smem_u32(bp + 16 * kk * sb + 16 * jp), b0, b1, b2, b3);
            mma_bf16(acc[2 * jp], p[kk], b0, b1);
            mma_bf16(acc[2 * jp + 1], p[kk], b2, b3);
        }
}

// Accumulators of a 16 x 8NT product (C layout) as the A fragments of the
// next product, rounded to bf16: n tiles 2kk, 2kk+1 are k slice kk (C(g,
// 2t..) of tile 2kk is A(g, 2t..) = a0; its row g+8 is a1; tile 2kk+1 gives
// a2, a3).
template <int NT>
__device__ __forceinline__ void c_to_a(const float (*c)[4], u32 (*a)[4]) {
#pragma unroll
    for (int kk = 0; kk < NT / 2; kk++) {
        a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

template <int NT>
__device__ __forceinline__ void zero(float (*acc)[4]) {
#pragma unroll
    for (int j = 0; j < NT; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) acc[j][e] = 0.f;
}

// Stores a warp's 16 x D accumulators (C layout) as bf16 rows row_lo (c0,
// c1, times mul_lo) and row_lo + 8 (c2, c3, times mul_hi), columns col0 ..,
// of a row-major matrix `width` wide; rows at or past t are skipped.
template <int D>
__device__ __forceinline__ void store_rows(bf16_t* dst, const float (*acc)[4], int row_lo, int t,
                                           long long width, int col0, float mul_lo, float mul_hi) {
    const int tq = threadIdx.x & 3;
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
        const int row = row_lo + 8 * hh;
        if (row >= t) continue;
        const float mul = hh ? mul_hi : mul_lo;
        u32* out = (u32*)(dst + row * width + col0 + 2 * tq);
#pragma unroll
        for (int j = 0; j < D / 8; j++) out[4 * j] = pack_bf16(acc[j][2 * hh] * mul, acc[j][2 * hh + 1] * mul);
    }
}

__device__ __forceinline__ void check_smem(int kernel, int d) {
    if (dynamic_smem_bytes() < (u32)attn_smem_bytes(kernel, d)) __trap();
}

// Common arguments of the kernels.
struct AttnArgs {
    const int* run_start;  // [t]
    int t, n_heads, group, window;  // window 0: none
    float scale;
};

template <int D>
__device__ void attn_fwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse,
                         const AttnArgs a) {
    DYNAMIC_SMEM(smem);
    check_smem(ATT_FWD, D);
    constexpr int S = D + ATT_PAD;
    bf16_t* sq = (bf16_t*)smem;
    bf16_t* sk = sq + ATT_ROWS * S;
    bf16_t* sv = sk + ATT_ROWS * S;
    // The last query blocks see the most keys: they go first (blocks start in
    // index order), so the grid's tail is short blocks.
    const int h = blockIdx.y, i0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long qw = (long long)a.n_heads * D, kw = (long long)(a.n_heads / a.group) * D;
    const int kcol = (h / a.group) * D;
    const float sl2 = a.scale * LOG2E;

    // This thread's rows (c0, c1 and c2, c3 of every accumulator tile).
    const int row[2] = {i0 + warp * 16 + (lane >> 2), i0 + warp * 16 + (lane >> 2) + 8};
    int first[2];
#pragma unroll
    for (int r = 0; r < 2; r++) first[r] = row[r] < a.t ? first_key(a.run_start, row[r], a.window) : row[r];
    float o[D / 8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    zero<D / 8>(o);

    const int last = min(i0 + ATT_ROWS, a.t) - 1;
    // Key tiles from band_lo up to i0 - ATT_ROWS + 1 are seen whole by every row.
    const int band_lo = first_key(a.run_start, last, a.window);
    const int j_first = first_key(a.run_start, i0, a.window) / ATT_ROWS * ATT_ROWS;
    load_rows<D>(sq, q, i0, ATT_ROWS, a.t, qw, h * D);
    load_rows<D>(sk, k, j_first, ATT_ROWS, a.t, kw, kcol);
    cp_async_commit();
    load_rows<D>(sv, v, j_first, ATT_ROWS, a.t, kw, kcol);
    cp_async_commit();
    for (int j0 = j_first; j0 <= last; j0 += ATT_ROWS) {
        const bool more = j0 + ATT_ROWS <= last;
        cp_async_wait<1>();  // this tile's k (and q); its v may still be in flight
        __syncthreads();
        float s[ATT_ROWS / 8][4];
        zero<ATT_ROWS / 8>(s);
        mma_abt<ATT_ROWS / 8, D>(s, sq + warp * 16 * S, S, sk, S);

        // Online softmax in log2 units: scores scaled, masked to -inf; per
        // row the new maximum over the quad of lanes that share it, the old
        // sums and outputs rescaled to it.
        if (j0 >= band_lo && j0 + ATT_ROWS - 1 <= i0)
            each_entry<ATT_ROWS / 8>([&](int j, int e, int, int) { s[j][e] *= sl2; });
        else
            each_entry<ATT_ROWS / 8>([&](int j, int e, int r, int c) {
                s[j][e] = j0 + c >= first[r] && j0 + c <= row[r] ? s[j][e] * sl2 : NEG_INF;
            });
        float mx[2] = {m[0], m[1]};
        each_entry<ATT_ROWS / 8>([&](int j, int e, int r, int) { mx[r] = fmaxf(mx[r], s[j][e]); });
        float base[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            // Nothing seen yet: any finite base leaves every term 0.
            base[r] = mx[r] == NEG_INF ? 0.f : mx[r];
            const float alpha = exp2f(m[r] - base[r]);
            m[r] = mx[r];
            l[r] *= alpha;
#pragma unroll
            for (int j = 0; j < D / 8; j++) {
                o[j][2 * r] *= alpha;
                o[j][2 * r + 1] *= alpha;
            }
        }
        each_entry<ATT_ROWS / 8>([&](int j, int e, int r, int) {
            s[j][e] = exp2f(s[j][e] - base[r]);
            l[r] += s[j][e];
        });
        u32 p[ATT_ROWS / 16][4];
        c_to_a<ATT_ROWS / 8>(s, p);
        cp_async_wait<0>();  // this tile's v
        __syncthreads();     // and every warp is done with k: the next tile's may come
        if (more) load_rows<D>(sk, k, j0 + ATT_ROWS, ATT_ROWS, a.t, kw, kcol);
        cp_async_commit();
        mma_ab<D / 8, ATT_ROWS / 16>(o, p, sv, S);
        __syncthreads();  // every warp is done with v
        if (more) load_rows<D>(sv, v, j0 + ATT_ROWS, ATT_ROWS, a.t, kw, kcol);
        cp_async_commit();
    }
    const int tq = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        // Every query sees itself, so l > 0 on real rows; lse in natural log.
        if (tq == 0 && row[r] < a.t) lse[row[r] * a.n_heads + h] = m[r] * LN2 + logf(l[r]);
    }
    store_rows<D>(out, o, row[0], a.t, qw, h * D, 1.f / l[0], 1.f / l[1]);
}

// Δ[r] = Σ dout[r, :] · out[r, :] over the `rows` = t·n_heads rows of d
// values (out[t, n_heads·d] read as [t·n_heads, d]), one warp per row.
template <typename T>
__device__ void attn_delta_impl(const T* out, const T* dout, float* delta, int rows, int d) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * blockDim.x >> 5;
    // The same r across a warp, so the shuffles see all its lanes.
    for (long long r = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; r < rows; r += warps) {
        float s = 0.f;
        for (int c = lane; c < d; c += 32) s += ld(out, r * d + c) * ld(dout, r * d + c);
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) delta[r] = s;
    }
}
extern "C" __global__ void attn_delta(const bf16_t* out, const bf16_t* dout, float* delta, int rows, int d) {
    attn_delta_impl(out, dout, delta, rows, d);
}
extern "C" __global__ void attn_delta_f32(const float* out, const float* dout, float* delta, int rows, int d) {
    attn_delta_impl(out, dout, delta, rows, d);
}

// Probabilities and score gradients of a warp's 16 x 8NT tile in place:
// s (raw scores) becomes p = exp(scale·s − lse) where visible (everywhere
// when `whole`), else 0; dp becomes ds = p·(dp − Δ)·scale. `vis`, `lse2_of`
// (the log-sum-exp in log2 units) and `delta_of` take (row r, column c) as
// each_entry gives them.
template <int NT, typename Vis, typename Lse, typename Delta>
__device__ __forceinline__ void probs_and_grads(float (*s)[4], float (*dp)[4], float scale, bool whole, Vis vis,
                                                Lse lse2_of, Delta delta_of) {
    const float sl2 = scale * LOG2E;
    auto grad = [&](int j, int e, int r, int c, bool seen) {
        const float p = seen ? exp2f(fmaf(s[j][e], sl2, -lse2_of(r, c))) : 0.f;
        s[j][e] = p;
        dp[j][e] = p * (dp[j][e] - delta_of(r, c)) * scale;
    };
    if (whole)
        each_entry<NT>([&](int j, int e, int r, int c) { grad(j, e, r, c, true); });
    else
        each_entry<NT>([&](int j, int e, int r, int c) { grad(j, e, r, c, vis(r, c)); });
}

template <int D>
__device__ void attn_dq(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,
                        const float* delta, bf16_t* dq, const AttnArgs a) {
    DYNAMIC_SMEM(smem);
    check_smem(ATT_DQ, D);
    constexpr int S = D + ATT_PAD;
    bf16_t* sq = (bf16_t*)smem;
    bf16_t* sdo = sq + ATT_ROWS * S;
    bf16_t* sk = sdo + ATT_ROWS * S;
    bf16_t* sv = sk + ATT_ROWS * S;
    const int h = blockIdx.y, i0 = (gridDim.x - 1 - blockIdx.x) * ATT_ROWS;  // longest first, as the forward
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long qw = (long long)a.n_heads * D, kw = (long long)(a.n_heads / a.group) * D;
    const int kcol = (h / a.group) * D;

    const int row[2] = {i0 + warp * 16 + (lane >> 2), i0 + warp * 16 + (lane >> 2) + 8};
    int first[2];
    float lr[2], dr[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const bool ok = row[r] < a.t;
        // Rows past t see nothing (first > row).
        first[r] = ok ? first_key(a.run_start, row[r], a.window) : row[r] + 1;
        lr[r] = ok ? lse[row[r] * a.n_heads + h] * LOG2E : 0.f;
        dr[r] = ok ? delta[row[r] * a.n_heads + h] : 0.f;
    }
    float acc[D / 8][4];
    zero<D / 8>(acc);

    const int last = min(i0 + ATT_ROWS, a.t) - 1;
    const int band_lo = first_key(a.run_start, last, a.window);
    const int j_first = first_key(a.run_start, i0, a.window) / ATT_ROWS * ATT_ROWS;
    load_rows<D>(sq, q, i0, ATT_ROWS, a.t, qw, h * D);
    load_rows<D>(sdo, dout, i0, ATT_ROWS, a.t, qw, h * D);
    load_rows<D>(sk, k, j_first, ATT_ROWS, a.t, kw, kcol);
    load_rows<D>(sv, v, j_first, ATT_ROWS, a.t, kw, kcol);
    cp_async_commit();
    for (int j0 = j_first; j0 <= last; j0 += ATT_ROWS) {
        const bool more = j0 + ATT_ROWS <= last;
        cp_async_wait<0>();
        __syncthreads();
        float s[ATT_ROWS / 8][4], dp[ATT_ROWS / 8][4];
        zero<ATT_ROWS / 8>(s);
        zero<ATT_ROWS / 8>(dp);
        mma_abt<ATT_ROWS / 8, D>(s, sq + warp * 16 * S, S, sk, S);
        mma_abt<ATT_ROWS / 8, D>(dp, sdo + warp * 16 * S, S, sv, S);
        probs_and_grads<ATT_ROWS / 8>(
            s, dp, a.scale, j0 >= band_lo && j0 + ATT_ROWS - 1 <= i0,
            [&](int r, int c) { return j0 + c >= first[r] && j0 + c <= row[r]; },
            [&](int r, int) { return lr[r]; }, [&](int r, int) { return dr[r]; });
        u32 ds[ATT_ROWS / 16][4];
        c_to_a<ATT_ROWS / 8>(dp, ds);
        // Issued here, when few registers are live: the next v comes during dq's product.
        __syncthreads();  // every warp is done with v
        if (more) load_rows<D>(sv, v, j0 + ATT_ROWS, ATT_ROWS, a.t, kw, kcol);
        cp_async_commit();
        mma_ab<D / 8, ATT_ROWS / 16>(acc, ds, sk, S);
        __syncthreads();  // every warp is done with k
        if (more) load_rows<D>(sk, k, j0 + ATT_ROWS, ATT_ROWS, a.t, kw, kcol);
        cp_async_commit();
    }
    store_rows<D>(dq, acc, row[0], a.t, qw, h * D, 1.f, 1.f);
}

template <int D>
__device__ void attn_dkdv(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                          const float* lse, const float* delta, bf16_t* dk, bf16_t* dv, const AttnArgs a) {
    DYNAMIC_SMEM(smem);
    check_smem(ATT_DKDV, D);
    constexpr int S = D + ATT_PAD;
    bf16_t* sk = (bf16_t*)smem;
    bf16_t* sv = sk + ATT_ROWS * S;
    // Two buffers of a step's q and dout rows, then two of its statistics.
    bf16_t* sqd = sv + ATT_ROWS * S;
    float* sstat = (float*)(sqd + 4 * ATT_BQ * S);
    const int kvh = blockIdx.y, j0 = blockIdx.x * ATT_ROWS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long qw = (long long)a.n_heads * D, kw = (long long)(a.n_heads / a.group) * D;

    // This thread's keys (rows of the transposed tiles).
    const int key[2] = {j0 + warp * 16 + (lane >> 2), j0 + warp * 16 + (lane >> 2) + 8};
    float dkacc[D / 8][4], dvacc[D / 8][4];
    zero<D / 8>(dkacc);
    zero<D / 8>(dvacc);

    // The query steps that see these keys, the same for every head of the
    // group: i_lo, i_lo + ATT_BQ, .. (n_steps of them).
    const int jlast = min(j0 + ATT_ROWS, a.t) - 1;
    const int i_lo = j0 / ATT_BQ * ATT_BQ;
    int n_steps = 0;
    while (i_lo + n_steps * ATT_BQ < a.t && first_key(a.run_start, i_lo + n_steps * ATT_BQ, a.window) <= jlast)
        n_steps++;
    // Step n of the flattened (head of the group, query step) loop into buffer b.
    auto load_step = [&](int b, int n) {
        const int h = kvh * a.group + n / n_steps, i0 = i_lo + n % n_steps * ATT_BQ;
        load_rows<D>(sqd + 2 * b * ATT_BQ * S, q, i0, ATT_BQ, a.t, qw, h * D);
        load_rows<D>(sqd + (2 * b + 1) * ATT_BQ * S, dout, i0, ATT_BQ, a.t, qw, h * D);
        if (threadIdx.x < ATT_BQ) {
            float* st = sstat + 3 * b * ATT_BQ;
            const int i = i0 + threadIdx.x;
            const bool ok = i < a.t;
            st[threadIdx.x] = ok ? lse[i * a.n_heads + h] * LOG2E : 0.f;
            st[ATT_BQ + threadIdx.x] = ok ? delta[i * a.n_heads + h] : 0.f;
            // Queries past t see no key.
            ((int*)st)[2 * ATT_BQ + threadIdx.x] = ok ? first_key(a.run_start, i, a.window) : 0x7fffffff;
        }
    };
    load_rows<D>(sk, k, j0, ATT_ROWS, a.t, kw, kvh * D);
    load_rows<D>(sv, v, j0, ATT_ROWS, a.t, kw, kvh * D);
    const int steps = a.group * n_steps;
    if (steps > 0) load_step(0, 0);
    cp_async_commit();
    for (int n = 0; n < steps; n++) {
        const int b = n & 1, i0 = i_lo + n % n_steps * ATT_BQ;
        // The other buffer was last read in step n - 1, before its closing barrier.
        if (n + 1 < steps) load_step(b ^ 1, n + 1);
        cp_async_commit();
        cp_async_wait<1>();  // this step's rows (and k, v)
        __syncthreads();
        const bf16_t* sq = sqd + 2 * b * ATT_BQ * S;
        const bf16_t* sdo = sq + ATT_BQ * S;
        const float* sl = sstat + 3 * b * ATT_BQ;
        const float* sd = sl + ATT_BQ;
        const int* sf = (const int*)(sd + ATT_BQ);
        // Transposed tiles: rows are this warp's 16 keys, columns the
        // step's queries. sᵀ = k·qᵀ, dpᵀ = v·doutᵀ.
        float s[ATT_BQ / 8][4], dp[ATT_BQ / 8][4];
        zero<ATT_BQ / 8>(s);
        zero<ATT_BQ / 8>(dp);
        mma_abt<ATT_BQ / 8, D>(s, sk + warp * 16 * S, S, sq, S);
        mma_abt<ATT_BQ / 8, D>(dp, sv + warp * 16 * S, S, sdo, S);
        // Every key of the block is seen by every real query of the step
        // (padded queries have zero rows and statistics: p·0 adds nothing).
        const bool whole = j0 + ATT_ROWS - 1 <= i0 &&
                           j0 >= first_key(a.run_start, min(i0 + ATT_BQ, a.t) - 1, a.window);
        probs_and_grads<ATT_BQ / 8>(
            s, dp, a.scale, whole, [&](int r, int c) { return key[r] >= sf[c] && key[r] <= i0 + c; },
            [&](int, int c) { return sl[c]; }, [&](int, int c) { return sd[c]; });
        // dv += pᵀ·dout, dk += dsᵀ·q.
        u32 pa[ATT_BQ / 16][4];
        c_to_a<ATT_BQ / 8>(s, pa);
        mma_ab<D / 8, ATT_BQ / 16>(dvacc, pa, sdo, S);
        c_to_a<ATT_BQ / 8>(dp, pa);
        mma_ab<D / 8, ATT_BQ / 16>(dkacc, pa, sq, S);
        __syncthreads();  // every warp is done with buffer b
    }
    store_rows<D>(dk, dkacc, key[0], a.t, kw, kvh * D, 1.f, 1.f);
    store_rows<D>(dv, dvacc, key[0], a.t, kw, kvh * D, 1.f, 1.f);
}

// Attention on the CUDA cores, a block per (query row, head): generation's
// steps over the key/value cache, and every pass in f32 (the tensor-core
// kernels above take bf16). Each of the block's 4 warps takes every 4th key
// (every 4th query for dk/dv), its lanes D/32 elements of each row; the
// warps' partial results merge through shared memory in a fixed order, so
// results are deterministic. Products in f32; scores in log2 units.
#define ROW_WARPS (ATT_THREADS / 32)

// Dot product of lane-held q (E elements, lane + 32e) with row r, summed
// over the warp (every lane gets it).
template <int E, typename T>
__device__ __forceinline__ float warp_dot(const float* q, const T* r) {
    const int lane = threadIdx.x & 31;
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) s += q[e] * ld(r, lane + 32 * e);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// Softmax-weighted sum of the value rows of keys first..last against query
// row q (scores scale·q·k): kv(j, &k, &v) gives key j's rows. Writes the
// D outputs to out and, where lse is given, the log-sum-exp (natural log).
template <int D, typename T, typename KV>
__device__ void attn_row_fwd(const T* q, int first, int last, float scale, KV kv, T* out, float* lse) {
    constexpr int E = D / 32;
    __shared__ float sm[ROW_WARPS], sl[ROW_WARPS], so[ROW_WARPS][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float qv[E], o[E], m = NEG_INF, l = 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) {
        qv[e] = ld(q, lane + 32 * e) * (scale * LOG2E);
        o[e] = 0.f;
    }
    for (int j = first + warp; j <= last; j += ROW_WARPS) {
        const T *kr, *vr;
        kv(j, kr, vr);
        const float sc = warp_dot<E>(qv, kr);
        const float mn = fmaxf(m, sc), alpha = exp2f(m - mn), pj = exp2f(sc - mn);
        l = l * alpha + pj;
#pragma unroll
        for (int e = 0; e < E; e++) o[e] = o[e] * alpha + pj * ld(vr, lane + 32 * e);
        m = mn;
    }
    if (lane == 0) {
        sm[warp] = m;
        sl[warp] = l;
    }
#pragma unroll
    for (int e = 0; e < E; e++) so[warp][lane + 32 * e] = o[e];
    __syncthreads();
    if (warp != 0) return;
    // Warp 0 saw key `first`, so the maximum is finite; a warp that saw no
    // key (m = -inf) weighs 0.
    float mx = sm[0];
    for (int w = 1; w < ROW_WARPS; w++) mx = fmaxf(mx, sm[w]);
    float wt[ROW_WARPS], sum = 0.f;
    for (int w = 0; w < ROW_WARPS; w++) {
        wt[w] = exp2f(sm[w] - mx);
        sum += sl[w] * wt[w];
    }
#pragma unroll
    for (int e = 0; e < E; e++) {
        float acc = 0.f;
        for (int w = 0; w < ROW_WARPS; w++) acc += so[w][lane + 32 * e] * wt[w];
        st(out, lane + 32 * e, acc / sum);
    }
    if (lse != nullptr && lane == 0) *lse = mx * LN2 + logf(sum);
}

// Adds the warps' partial rows acc (E per lane) and stores the sum at dst.
template <int D, typename T>
__device__ __forceinline__ void sum_warps_store(const float* acc, T* dst) {
    constexpr int E = D / 32;
    __shared__ float part[ROW_WARPS][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int e = 0; e < E; e++) part[warp][lane + 32 * e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int e = 0; e < E; e++) {
        float s = 0.f;
        for (int w = 0; w < ROW_WARPS; w++) s += part[w][lane + 32 * e];
        st(dst, lane + 32 * e, s);
    }
}

// Generation's attention: n new queries at positions start .. start+n-1,
// q[n, n_heads*D]; keys and values of positions below start from the caches
// kc/vc[≥ start, n_kv_heads*D], the others from the new k/v[n, n_kv_heads*D].
// Query i sees positions from the window's start (no segments) to its own,
// as kernels/src/attention.rs `attention_cached` (whose bf16 products round
// probabilities to bf16, as the tiled kernels do; the f32 ones do not, nor
// does this kernel, in either type). Grid (n, n_heads).
template <int D, typename T>
__device__ void attn_cached(const T* q, const T* k, const T* v, const T* kc, const T* vc, T* out, int start,
                            int n_heads, int group, int window, float scale) {
    const int i = blockIdx.x, h = blockIdx.y, p = start + i;
    const long long qw = (long long)n_heads * D, kw = (long long)(n_heads / group) * D;
    const int kcol = (h / group) * D;
    const int first = window > 0 && p + 1 - window > 0 ? p + 1 - window : 0;
    auto kv = [&](int j, const T*& kr, const T*& vr) {
        const long long at = j < start ? j * kw + kcol : (j - start) * kw + kcol;
        kr = (j < start ? kc : k) + at;
        vr = (j < start ? vc : v) + at;
    };
    attn_row_fwd<D>(q + i * qw + h * D, first, p, scale, kv, out + i * qw + h * D, (float*)nullptr);
}

// f32 training attention, the meaning of attn_fwd (segments, window, GQA):
// out and lse of query row i, head h. Grid (t, n_heads).
template <int D>
__device__ void attn_f32_fwd(const float* q, const float* k, const float* v, float* out, float* lse,
                             const AttnArgs a) {
    const int i = blockIdx.x, h = blockIdx.y;
    const long long qw = (long long)a.n_heads * D, kw = (long long)(a.n_heads / a.group) * D;
    const int kcol = (h / a.group) * D;
    auto kv = [&](int j, const float*& kr, const float*& vr) {
        kr = k + j * kw + kcol;
        vr = v + j * kw + kcol;
    };
    attn_row_fwd<D>(q + i * qw + h * D, first_key(a.run_start, i, a.window), i, a.scale, kv, out + i * qw + h * D,
                    lse + (long long)i * a.n_heads + h);
}

// f32 dq of query row i, head h: Σ over its keys of ds·k, ds = p·(dp − Δ)·scale,
// p = exp(scale·q·k − lse), dp = dout·v. Grid (t, n_heads).
template <int D>
__device__ void attn_f32_dq(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                            const float* delta, float* dq, const AttnArgs a) {
    constexpr int E = D / 32;
    const int i = blockIdx.x, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long qw = (long long)a.n_heads * D, kw = (long long)(a.n_heads / a.group) * D;
    const int kcol = (h / a.group) * D;
    const float sl2 = a.scale * LOG2E, lse2 = lse[(long long)i * a.n_heads + h] * LOG2E,
                dl = delta[(long long)i * a.n_heads + h];
    float qv[E], dov[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        qv[e] = q[i * qw + h * D + lane + 32 * e];
        dov[e] = dout[i * qw + h * D + lane + 32 * e];
        acc[e] = 0.f;
    }
    for (int j = first_key(a.run_start, i, a.window) + warp; j <= i; j += ROW_WARPS) {
        const float* kr = k + j * kw + kcol;
        const float p = exp2f(fmaf(warp_dot<E>(qv, kr), sl2, -lse2));
        const float ds = p * (warp_dot<E>(dov, v + j * kw + kcol) - dl) * a.scale;
#pragma unroll
        for (int e = 0; e < E; e++) acc[e] += ds * kr[lane + 32 * e];
    }
    sum_warps_store<D>(acc, dq + i * qw + h * D);
}

// f32 dk and dv of key row j, kv head kvh: over the group's heads and the
// queries that see j (from j on, while their first key is at most j: first
// keys do not decrease), dk += ds·q, dv += p·dout. Grid (t, n_kv_heads).
template <int D>
__device__ void attn_f32_dkdv(const float* q, const float* k, const float* v, const float* dout, const float* lse,
                              const float* delta, float* dk, float* dv, const AttnArgs a) {
    constexpr int E = D / 32;
    __shared__ float dkp[ROW_WARPS][D];
    const int j = blockIdx.x, kvh = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long qw = (long long)a.n_heads * D, kw = (long long)(a.n_heads / a.group) * D;
    const float sl2 = a.scale * LOG2E;
    float kv_[E], vv[E], dka[E], dva[E];
#pragma unroll
    for (int e = 0; e < E; e++) {
        kv_[e] = k[j * kw + kvh * D + lane + 32 * e];
        vv[e] = v[j * kw + kvh * D + lane + 32 * e];
        dka[e] = dva[e] = 0.f;
    }
    for (int hg = 0; hg < a.group; hg++) {
        const int h = kvh * a.group + hg;
        for (int i = j + warp; i < a.t && first_key(a.run_start, i, a.window) <= j; i += ROW_WARPS) {
            const float* qr = q + i * qw + h * D;
            const float* dor = dout + i * qw + h * D;
            const long long r = (long long)i * a.n_heads + h;
            const float p = exp2f(fmaf(warp_dot<E>(kv_, qr), sl2, -lse[r] * LOG2E));
            const float ds = p * (warp_dot<E>(vv, dor) - delta[r]) * a.scale;
#pragma unroll
            for (int e = 0; e < E; e++) {
                dka[e] += ds * qr[lane + 32 * e];
                dva[e] += p * dor[lane + 32 * e];
            }
        }
    }
    // dk through dkp here, dv through sum_warps_store's own buffer.
#pragma unroll
    for (int e = 0; e < E; e++) dkp[warp][lane + 32 * e] = dka[e];
    sum_warps_store<D>(dva, dv + j * kw + kvh * D);
    if (warp != 0) return;
#pragma unroll
    for (int e = 0; e < E; e++) {
        float s = 0.f;
        for (int w = 0; w < ROW_WARPS; w++) s += dkp[w][lane + 32 * e];
        dk[j * kw + kvh * D + lane + 32 * e] = s;
    }
}

// The entry points for one head dim.
#define ATTN_ENTRIES(D)                                                                                        \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_fwd_##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* out, float* lse,               \
                     const int* run_start, int t, int n_heads, int group, int window, float scale) {          \
        attn_fwd<D>(q, k, v, out, lse, AttnArgs{run_start, t, n_heads, group, window, scale});               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_dq_##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse,   \
                    const float* delta, bf16_t* dq, const int* run_start, int t, int n_heads, int group,       \
                    int window, float scale) {                                                                 \
        attn_dq<D>(q, k, v, dout, lse, delta, dq, AttnArgs{run_start, t, n_heads, group, window, scale});    \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_dkdv_##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse, \
                      const float* delta, bf16_t* dk, bf16_t* dv, const int* run_start, int t, int n_heads,    \
                      int group, int window, float scale) {                                                    \
        attn_dkdv<D>(q, k, v, dout, lse, delta, dk, dv, AttnArgs{run_start, t, n_heads, group, window, scale}); \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_cached_##D(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* kc, const bf16_t* vc, \
                        bf16_t* out, int start, int n_heads, int group, int window, float scale) {             \
        attn_cached<D>(q, k, v, kc, vc, out, start, n_heads, group, window, scale);                           \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_f32_cached_##D(const float* q, const float* k, const float* v, const float* kc, const float* vc,  \
                            float* out, int start, int n_heads, int group, int window, float scale) {          \
        attn_cached<D>(q, k, v, kc, vc, out, start, n_heads, group, window, scale);                           \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_f32_fwd_##D(const float* q, const float* k, const float* v, float* out, float* lse,              \
                         const int* run_start, int t, int n_heads, int group, int window, float scale) {      \
        attn_f32_fwd<D>(q, k, v, out, lse, AttnArgs{run_start, t, n_heads, group, window, scale});           \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_f32_dq_##D(const float* q, const float* k, const float* v, const float* dout, const float* lse,  \
                        const float* delta, float* dq, const int* run_start, int t, int n_heads, int group,    \
                        int window, float scale) {                                                             \
        attn_f32_dq<D>(q, k, v, dout, lse, delta, dq, AttnArgs{run_start, t, n_heads, group, window, scale}); \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS)                                                  \
        attn_f32_dkdv_##D(const float* q, const float* k, const float* v, const float* dout, const float* lse, \
                          const float* delta, float* dk, float* dv, const int* run_start, int t, int n_heads,  \
                          int group, int window, float scale) {                                                \
        attn_f32_dkdv<D>(q, k, v, dout, lse, delta, dk, dv,                                                    \
                         AttnArgs{run_start, t, n_heads, group, window, scale});                              \
    }

ATTN_ENTRIES(32)
ATTN_ENTRIES(64)
ATTN_ENTRIES(128)
