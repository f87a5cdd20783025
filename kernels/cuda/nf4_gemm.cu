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

// Block tile: BM rows of X times BN output columns; 8 warps in a 2 x 4 grid,
// each owning 64 x 32 outputs (4 x 4 mma tiles).
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
    __syncthreads();

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int g = lane >> 2, t4 = lane & 3;

    float acc[4][4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++)
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

    for (int k0 = 0; k0 < inner; k0 += BK) {
        // A tile: BM x BK of x (row stride `inner`), zero outside; 16-byte
        // loads where the row allows them.
        for (int e = tid; e < BM * BK / 8; e += THREADS) {
            int r = e / (BK / 8), c = (e % (BK / 8)) * 8;
            int gm = m0 + r, gk = k0 + c;
            const bf16_t* src = x + (long long)gm * inner + gk;
            if (gm < M && gk + 8 <= inner && (inner & 7) == 0) {
                *(uint4*)&As[r][c] = *(const uint4*)src;
            } else {
                for (int i = 0; i < 8; i++) As[r][c + i] = (gm < M && gk + i < inner) ? src[i] : (bf16_t)0;
            }
        }
        if (!TRANS) {
            // W rows c0..c0+BN, columns k0..k0+BK: one block per row. Each
            // thread dequantizes 32 codes (16 bytes) of one row.
            int r = tid >> 1, half = tid & 1;
            int n = c0 + r;
            if (n < N) {
                long long flat = (long long)n * K + k0 + half * 32;
                float a = block_absmax(w, flat >> 6);
                const unsigned char* p = w.packed + (flat >> 1);
                uint4 bytes = *(const uint4*)p;
                const unsigned char* q = (const unsigned char*)&bytes;
                for (int i = 0; i < 16; i++) {
                    u32 lo = f32_to_bf16(lut[q[i] >> 4] * a), hi = f32_to_bf16(lut[q[i] & 15] * a);
                    *(u32*)&Bs[r][half * 32 + 2 * i] = lo | (hi << 16);
                }
            } else {
                for (int i = 0; i < 32; i++) Bs[r][half * 32 + i] = 0;
            }
        } else {
            // W rows k0..k0+BK (inner), columns c0..c0+BN (output), stored
            // transposed: Bs[column][row]. Each thread takes 32 codes of one row.
            int r = tid >> 2, quarter = tid & 3;
            int n = k0 + r;
            int col = c0 + quarter * 32;
            if (n < N && col < K) {
                long long flat = (long long)n * K + col;
                float a = block_absmax(w, flat >> 6);
                const unsigned char* p = w.packed + (flat >> 1);
                uint4 bytes = *(const uint4*)p;
                const unsigned char* q = (const unsigned char*)&bytes;
                for (int i = 0; i < 16; i++) {
                    Bs[quarter * 32 + 2 * i][r] = f32_to_bf16(lut[q[i] >> 4] * a);
                    Bs[quarter * 32 + 2 * i + 1][r] = f32_to_bf16(lut[q[i] & 15] * a);
                }
            } else {
                for (int i = 0; i < 32; i++) Bs[quarter * 32 + i][r] = 0;
            }
        }
        __syncthreads();

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

extern "C" __global__ void __launch_bounds__(THREADS)
nf4_gemm_fwd(const bf16_t* x, const unsigned char* packed, const unsigned char* absmax,
             const float* nested_scales, const float* nested_map, float offset,
             bf16_t* y, int M, int N, int K) {
    Nf4 w = {packed, absmax, nested_scales, nested_map, offset};
    nf4_gemm<false>(x, w, y, M, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS)
nf4_gemm_dgrad(const bf16_t* dy, const unsigned char* packed, const unsigned char* absmax,
               const float* nested_scales, const float* nested_map, float offset,
               bf16_t* dx, int M, int N, int K) {
    Nf4 w = {packed, absmax, nested_scales, nested_map, offset};
    nf4_gemm<true>(dy, w, dx, M, N, K);
}
