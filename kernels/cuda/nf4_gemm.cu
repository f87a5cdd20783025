// NF4 GEMM on tensor cores (mma.sync m16n8k16, bf16 operands, f32 accumulation).
//
//   forward     (TRANS = false): Y[M,N] = X[M,K] · dequant(W)[N,K]ᵀ
//   input grad  (TRANS = true):  Y[M,K] = X[M,N] · dequant(W)[N,K]
//
// W is bitsandbytes NF4 with double quantization, block 64 over the
// row-major flattened weight; K must be a multiple of 64 so every 64-wide
// slice of a row is one block. Tiles of W are dequantized to bf16 in shared
// memory, never in global memory. bf16 is handled as raw 16-bit words so the
// source needs no CUDA headers (NVRTC compiles it as is).

typedef unsigned short bf16_t;
typedef unsigned int u32;

#define BM 128
#define BN 128
#define BK 64
#define PAD 8
#define THREADS 256

__device__ __forceinline__ float bf16_to_f32(bf16_t h) { return __uint_as_float(((u32)h) << 16); }

// Round to nearest even, as the CPU's half::bf16::from_f32 (NaN kept quiet).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

__constant__ float NF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

struct Nf4 {
    const unsigned char* packed;   // two codes per byte, even index high
    const unsigned char* absmax;   // one code per 64-block
    const float* nested_scales;    // one per 256 blocks
    const float* nested_map;       // 256 entries
    float offset;
};

__device__ __forceinline__ float block_absmax(const Nf4& w, long long b) {
    return w.nested_map[w.absmax[b]] * w.nested_scales[b >> 8] + w.offset;
}

__device__ __forceinline__ void mma_bf16(float* c, const u32* a, const u32* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Packs two floats as bf16x2, rounding to nearest even: `lo` in the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// One thread's share of a tile, held in registers between the global loads
// (issued before the current tile's math) and the shared-memory stores.
struct Staged {
    uint4 a[BM * BK / 8 / THREADS];  // 16-byte chunks of the activation tile
    uint4 codes;                     // 32 packed NF4 codes of one 64-block
    float absmax;
    bool valid;
};

// Block tile: BM rows of X times BN output columns; 8 warps in a 2 x 4 grid,
// each owning 64 x 32 outputs (4 x 4 mma tiles). The next tile's global
// loads are in flight while this tile's mma run.
template <bool TRANS>
__device__ void nf4_gemm(const bf16_t* __restrict__ x, Nf4 w, bf16_t* __restrict__ y,
                         int M, int N, int K) {
    // Inner (reduction) length and output width.
    const int inner = TRANS ? N : K;
    const int width = TRANS ? K : N;
    __shared__ __align__(16) bf16_t As[BM][BK + PAD];
    __shared__ __align__(16) bf16_t Bs[BN][BK + PAD];  // Bs[out column][inner index]
    // The code book in shared memory: lanes look up different codes, which
    // constant memory would serialise.
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4[threadIdx.x];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int g = lane >> 2, t4 = lane & 3;
    // This thread's W slice: a row and a 32-code run of it.
    const int wr = TRANS ? tid >> 2 : tid >> 1;
    const int wc = TRANS ? (tid & 3) * 32 : (tid & 1) * 32;

    auto load = [&](Staged& st, int k0) {
        for (int i = 0; i < BM * BK / 8 / THREADS; i++) {
            int e = tid + i * THREADS;
            int r = e / (BK / 8), c = (e % (BK / 8)) * 8;
            int gm = m0 + r, gk = k0 + c;
            const bf16_t* src = x + (long long)gm * inner + gk;
            if (gm < M && gk + 8 <= inner && (inner & 7) == 0) {
                st.a[i] = *(const uint4*)src;
            } else {
                bf16_t tmp[8];
                for (int q = 0; q < 8; q++) tmp[q] = (gm < M && gk + q < inner) ? src[q] : (bf16_t)0;
                st.a[i] = *(const uint4*)tmp;
            }
        }
        // Forward: W row c0+wr, columns k0+wc... ; input grad: W row k0+wr,
        // columns c0+wc... Either way 32 codes inside one 64-block.
        int n = TRANS ? k0 + wr : c0 + wr;
        int col = TRANS ? c0 + wc : k0 + wc;
        st.valid = n < N && col < K;
        if (st.valid) {
            long long flat = (long long)n * K + col;
            st.absmax = block_absmax(w, flat >> 6);
            st.codes = *(const uint4*)(w.packed + (flat >> 1));
        }
    };
    auto store = [&](const Staged& st) {
        for (int i = 0; i < BM * BK / 8 / THREADS; i++) {
            int e = tid + i * THREADS;
            *(uint4*)&As[e / (BK / 8)][(e % (BK / 8)) * 8] = st.a[i];
        }
        const unsigned char* q = (const unsigned char*)&st.codes;
        for (int i = 0; i < 16; i++) {
            u32 pair = st.valid ? pack_bf16x2(lut[q[i] >> 4] * st.absmax, lut[q[i] & 15] * st.absmax) : 0u;
            if (!TRANS) {
                *(u32*)&Bs[wr][wc + 2 * i] = pair;
            } else {
                Bs[wc + 2 * i][wr] = (bf16_t)(pair & 0xffffu);
                Bs[wc + 2 * i + 1][wr] = (bf16_t)(pair >> 16);
            }
        }
    };

    float acc[4][4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

    Staged st;
    load(st, 0);
    __syncthreads();  // the code book is in place
    for (int k0 = 0; k0 < inner; k0 += BK) {
        store(st);
        __syncthreads();
        if (k0 + BK < inner) load(st, k0 + BK);

        for (int kk = 0; kk < BK; kk += 16) {
            u32 a[4][4], b[4][2];
            for (int i = 0; i < 4; i++) {
                int r = wm * 64 + i * 16 + g;
                int c = kk + t4 * 2;
                a[i][0] = *(const u32*)&As[r][c];
                a[i][1] = *(const u32*)&As[r + 8][c];
                a[i][2] = *(const u32*)&As[r][c + 8];
                a[i][3] = *(const u32*)&As[r + 8][c + 8];
            }
            for (int j = 0; j < 4; j++) {
                int n = wn * 32 + j * 8 + g;
                int c = kk + t4 * 2;
                b[j][0] = *(const u32*)&Bs[n][c];
                b[j][1] = *(const u32*)&Bs[n][c + 8];
            }
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) mma_bf16(acc[i][j], a[i], b[j]);
        }
        __syncthreads();
    }

    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int h = 0; h < 2; h++) {
                int m = m0 + wm * 64 + i * 16 + g + h * 8;
                int n = c0 + wn * 32 + j * 8 + t4 * 2;
                if (m >= M) continue;
                if (n < width) y[(long long)m * width + n] = f32_to_bf16(acc[i][j][2 * h]);
                if (n + 1 < width) y[(long long)m * width + n + 1] = f32_to_bf16(acc[i][j][2 * h + 1]);
            }
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
nf4_gemm_fwd(const bf16_t* x, const unsigned char* packed, const unsigned char* absmax,
             const float* nested_scales, const float* nested_map, float offset,
             bf16_t* y, int M, int N, int K) {
    Nf4 w = {packed, absmax, nested_scales, nested_map, offset};
    nf4_gemm<false>(x, w, y, M, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
nf4_gemm_dgrad(const bf16_t* dy, const unsigned char* packed, const unsigned char* absmax,
               const float* nested_scales, const float* nested_map, float offset,
               bf16_t* dx, int M, int N, int K) {
    Nf4 w = {packed, absmax, nested_scales, nested_map, offset};
    nf4_gemm<true>(dy, w, dx, M, N, K);
}
