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
//
// v4. Block tile BM x BN = 256 x 128 (X rows x output columns), BK = 32 of
// the reduction per step; 8 warps in a 4 x 2 grid, each owning 64 x 64
// outputs (4 x 8 mma tiles, 128 f32 accumulators per thread); one block
// per SM (launch bounds 256, 1: up to 255 registers, no spills).
//   - The X tile and the packed NF4 codes go global -> shared with cp.async
//     (16 bytes, zero-filled out of range), STAGES = 4 deep.
//   - Each W tile is dequantized once per block into bf16 shared memory
//     and serves all 256 rows of X (v3b: 128), halving dequantization per
//     flop. Two buffers: tile kt+2 is dequantized while tile kt's second k
//     slice is multiplied.
//   - Fragments come from ldmatrix.x4 (.trans for the input-gradient W tile,
//     which is stored in its natural [inner][out] order), from XOR-swizzled
//     layouts in which ldmatrix, cp.async and the dequantized 16-byte stores
//     are all free of bank conflicts (derivations at each layout below).
//   - One barrier per k tile, between the tile's two k slices: the second
//     slice's fragments are in registers before it, so after it every warp
//     has 32 mma ready while the next fragments load (see "Pipeline").
//   - absmax codes and scales are fetched one iteration ahead and finished
//     from a shared copy of nested_map, so no global load is waited on in
//     the loop.
// Dynamic shared memory: SMEM_BYTES (91200) — the launch must pass exactly
// that (the kernel traps if given less) and raise the function's
// MAX_DYNAMIC_SHARED_SIZE_BYTES to it. It fits every sm_80+ part (sm_86/89/
// 120 allow 99 KB per block). nested_map must have 256 entries.
//
// Epilogue (Epi below, all optional): the LoRA term s·Σ_r la[m, r]·lb(n, r)
// of rank r, a bf16 addend and a per-column scale, so that y = col_scale ⊙
// (X·op(W) + LoRA + addend) is one kernel (the fusion pass's NF4 + LoRA +
// DoRA group; la is x·lora_Aᵀ with lb lora_B in the forward, dy·lora_B with
// lb lora_A in the input gradient). The LoRA factors are f32; like the CPU's bf16 GEMM, each value is
// rounded to bf16 after its scale and the products summed in f32 (here on
// the CUDA cores, after the main loop, from shared memory: r·BM·BN FMAs
// per block against the main loop's K·BM·BN tensor-core MACs).
//
// Numerics are those of v1-v3b: each weight is NF4[code] * absmax in f32
// (absmax = nested_map[q] * nested_scale + offset, no fused multiply-add),
// rounded to bf16 (nearest even); products accumulate in f32 on the tensor
// cores; the output is rounded to bf16 (nearest even).

// bf16_t, u32 and the bf16 conversions: common.cuh.

#define BM 256
#define BN 128
#define BK 32
#define STAGES 4
#define THREADS 256

// Shared memory map (bytes from the 1024-aligned dynamic base).
#define A_STAGE (BM * BK * 2)                  // 16384: X tile, bf16
#define B_BUF (BN * BK * 2)                    //  8192: dequantized W tile, bf16
#define B_BUFS 2                               // W tiles: one read, one written
#define C_STAGE (BN * BK / 2)                  //  2048: packed codes of one W tile
#define OFF_A 0                                // STAGES X tiles
#define OFF_B (OFF_A + STAGES * A_STAGE)       // 65536: B_BUFS W buffers
#define OFF_C (OFF_B + B_BUFS * B_BUF)         // 81920: STAGES code tiles
#define OFF_NM (OFF_C + STAGES * C_STAGE)      // 90112: nested_map, 256 f32
#define OFF_LUT (OFF_NM + 1024)                // 91136: NF4 code book, 16 f32
#define SMEM_BYTES (OFF_LUT + 64)              // 91200
// The epilogue's staging of 16 ranks of the LoRA factors, reusing the main
// loop's shared memory: rows padded to 17 floats (conflict-free reads).
#define EPI_R 16
#define EPI_LD (EPI_R + 1)

// y = col_scale ⊙ (acc + s·Σ_r la[m, r]·lb(n, r) + addend[m, n]), each
// piece present when its pointer is non-null (r > 0 for the LoRA term);
// lb(n, r) = lb[n·lb_n + r·lb_r], so B_l may be stored either way round.
struct Epi {
    const float* la;  // [M, r]
    const float* lb;
    int r, lb_n, lb_r;
    float s;
    const bf16_t* addend;    // [M, width]
    const float* col_scale;  // [width]
};


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

// ---------------------------------------------------------------- PTX helpers

// mma_bf16, ldsm_x4, ldsm_x4_trans, cp_async16 and pack_bf16x2: common.cuh.

// ------------------------------------------------------------ shared layouts
//
// Bank model: 32 banks of 4 bytes, so a 16-byte chunk's bank group is
// (byte address / 16) % 8. ldmatrix serves each 8x8 matrix (8 rows of 16
// bytes) in one pass when its 8 row addresses fall in 8 distinct bank groups;
// 16-byte stores and cp.async are served a quarter warp (8 consecutive
// lanes) at a time with the same condition. (Checked with Nsight Compute on
// an H200: the shared loads show no bank conflicts. It does count about 1.5
// extra wavefronts per 16-byte dequantized store, which neither this model
// nor a whole-warp one explains; they are under 5% of shared wavefronts.)
//
// "K32" layout: a tile of R rows x 32 bf16 (64-byte rows, 4 chunks c = 0..3
// of 8 elements) used for the X tile [256 m][32 k] and the forward W tile
// [128 n][32 k]. Rows 2p and 2p+1 share the 128-byte line p: slot
// s = 4(r&1) + c, stored at slot s ^ (p & 3) of line p.
//   ldmatrix: the 8 rows r0..r0+7 (r0 % 8 == 0) of one matrix at one chunk c
//     lie in lines p0..p0+3 (p0 % 4 == 0), so p & 3 takes all 4 values: the
//     low 2 bits c ^ (p&3) are distinct across the lines and bit 2 (= r&1)
//     tells the two rows of a line apart -> 8 distinct groups.
//   stores: see the callers.
__device__ __forceinline__ u32 k32_off(int r, int c) {
    const int p = r >> 1;
    return (u32)(p * 128 + (((((r & 1) << 2) | c) ^ (p & 3)) << 4));
}
// "N128" layout: the input-gradient W tile [32 k][128 n] in W's own order
// (256-byte rows, 16 chunks c = 0..15): chunk c of row r is stored at chunk
// c ^ ((r ^ (c >> 3)) & 7) of the row (only the low 3 bits change).
//   ldmatrix.trans: 8 consecutive rows r0..r0+7 (r0 % 8 == 0) at one chunk c:
//     the XOR value (r & 7) ^ (c >> 3) is distinct per row -> 8 groups.
//   stores: a quarter warp writes the 8 chunks 2u + j (u = 0..7, j fixed) of
//     one row r. Chunks below 8 ({j, j+2, j+4, j+6}) are XORed with r & 7,
//     those above with (r & 7) ^ 1: the two sets of 4 have opposite parity
//     -> 8 distinct groups.
__device__ __forceinline__ u32 n128_off(int r, int c) {
    return (u32)(r * 256 + ((c ^ ((r ^ (c >> 3)) & 7)) << 4));
}

// ------------------------------------------------------------------- kernel
//
// Thread roles (tid = 0..255):
//   X tile loads: rows (tid >> 2) + 64i (i = 0..3), chunk tid & 3 — a quarter
//     warp writes rows 2q, 2q+1 (one K32 line) x chunks 0..3 = all 8 slots of
//     the line (XOR permutes them): conflict-free.
//   Code loads (tid < 128): 16 bytes = 32 codes, chunk tid of the code tile
//     (codes tile stored as 128 consecutive chunks):
//       forward: W row c0 + tid, columns k0 .. k0+31;
//       input grad: W row k0 + (tid >> 2), columns c0 + 32 (tid & 3) .. +31.
//   Dequantization: 16 codes = bytes 8 tid .. 8 tid + 7 of the code tile
//     (half h = tid & 1 of chunk tid >> 1):
//       forward: W row c0 + (tid >> 1) = tile row n, columns k0 + 16h .. +15
//         = K32 chunks 2h, 2h+1 of row n;
//       input grad: W row k0 + (tid >> 3) = tile row k, columns
//         c0 + 32((tid >> 1) & 3) + 16h = c0 + 16 (tid & 7) .. +15
//         = N128 chunks 2 (tid & 7), +1 of row k.
//     Each 16-element run lies inside one 64-block (K % 64 == 0, and the
//     run starts at a multiple of 16), so one absmax per thread per tile.
//   MMA: warp w owns rows wm*64 .. +63 (wm = w >> 1) and output columns
//     wn*64 .. +63 (wn = w & 1) of the block tile.
template <bool TRANS>
__device__ __forceinline__ void nf4_gemm(const bf16_t* __restrict__ x, const Nf4& w,
                                         const Epi& e, bf16_t* __restrict__ y, int M, int N,
                                         int K) {
    DYNAMIC_SMEM(smem);
    // Inner (reduction) length and output width.
    const int inner = TRANS ? N : K;
    const int width = TRANS ? K : N;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int m0 = blockIdx.y * BM, c0 = blockIdx.x * BN;
    const int T = (inner + BK - 1) / BK;  // k tiles
    const u32 sbase = smem_u32(smem);
    const float* lut = (const float*)(smem + OFF_LUT);

    if (dynamic_smem_bytes() < SMEM_BYTES) __trap();  // launched with too little shared memory
    if (tid < 16) ((float*)(smem + OFF_LUT))[tid] = NF4[tid];
    // nested_map in shared memory: the absmax of each tile is finished from
    // it, so no global load stands between a warp and its mma.
    const float* nmap = (const float*)(smem + OFF_NM);
    ((float*)(smem + OFF_NM))[tid] = w.nested_map[tid];  // THREADS == 256 entries

    // X rows are 16-byte aligned when inner % 8 == 0: always in the forward
    // (inner = K, a multiple of 64, which DeviceNf4::upload enforces);
    // otherwise the X tile is loaded element by element.
    const bool vec_ok = TRANS ? (N & 7) == 0 : true;
    const int a_row = tid >> 2, a_ch = tid & 3;
    // Rows a_row + 64i are 32 lines apart: same swizzle, 4096 bytes apart.
    const u32 a_soff = k32_off(a_row, a_ch);

    // X tile g -> stage g % STAGES. Row validity and the row pointers are
    // fixed per thread; only the k offset moves.
    const bf16_t* xp = x + (long long)(m0 + a_row) * inner + a_ch * 8;
    const long long x_rs = 64LL * inner;  // 64 rows
    u32 row_ok = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) row_ok |= (m0 + a_row + 64 * i < M) ? 1u << i : 0u;
    auto load_x = [&](int g) {
        const int k0 = g * BK;
        const u32 dst = sbase + OFF_A + (g % STAGES) * A_STAGE + a_soff;
        const bool k_ok = k0 + a_ch * 8 < inner;
        if (vec_ok) {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                // inner % 8 == 0: a chunk is wholly inside (k_ok) or out.
                const bool ok = ((row_ok >> i) & 1u) && k_ok;
                const bf16_t* src = ok ? xp + i * x_rs + k0 : x;
                cp_async16(dst + i * 4096, src, ok ? 16u : 0u);
            }
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const bool r_ok = (row_ok >> i) & 1u;
                const bf16_t* src = xp + i * x_rs + k0;
                const int e0 = k0 + a_ch * 8;
                u32 v[4];
#pragma unroll
                for (int q = 0; q < 4; q++) {
                    const int e = e0 + 2 * q;
                    const u32 lo = (r_ok && e < inner) ? (u32)src[2 * q] : 0u;
                    const u32 hi = (r_ok && e + 1 < inner) ? (u32)src[2 * q + 1] : 0u;
                    v[q] = lo | (hi << 16);
                }
                *(uint4*)(smem + (dst - sbase) + i * 4096) = make_uint4(v[0], v[1], v[2], v[3]);
            }
        }
    };
    // Packed codes of W tile g -> code stage g % STAGES (threads 0..127, one
    // 16-byte chunk each). Rows past N (and, in the input gradient, columns
    // past K) are not loaded: their weights are dequantized with absmax 0
    // (see absmax_at).
    //   forward: W row c0 + tid, columns k0 .. k0+31 -> byte (row K + k0) / 2;
    //   input grad: W row k0 + (tid >> 2), columns c0 + 32 (tid & 3) ..
    const int c_row0 = TRANS ? tid >> 2 : c0 + tid;       // + k0 in the input gradient
    const int c_col0 = TRANS ? c0 + 32 * (tid & 3) : 0;   // + k0 in the forward
    const unsigned char* cp = w.packed + (((long long)c_row0 * K + c_col0) >> 1);
    auto load_codes = [&](int g) {
        const int k0 = g * BK;
        const bool ok = tid < 128 && (TRANS ? k0 + c_row0 < N && c_col0 < K : c_row0 < N);
        if (ok)
            cp_async16(sbase + OFF_C + (g % STAGES) * C_STAGE + tid * 16,
                       cp + (TRANS ? (long long)k0 * (K >> 1) : (long long)(k0 >> 1)), 16u);
    };
    // Group g = {X tile g, codes of W tile g+1}; always committed (maybe
    // empty) so that group counting is uniform.
    auto load_group = [&](int g) {
        if (g < T) load_x(g);
        if (g + 1 < T) load_codes(g + 1);
        cp_async_commit();
    };
    // This thread's 64-block of W tile g, or false when the tile or the
    // thread's run is out of range.
    const int dq_r = TRANS ? tid >> 3 : tid >> 1;
    auto block_of = [&](int g, long long& blk) -> bool {
        const int k0 = g * BK;
        const int row = TRANS ? k0 + dq_r : c0 + dq_r;
        const int col = TRANS ? c0 + 16 * (tid & 7) : k0;
        blk = ((long long)row * K + col) >> 6;
        return g < T && row < N && col < K;
    };
    // absmax = nested_map[absmax[b]] * nested_scales[b >> 8] + offset, as v1-v3b
    // and the CPU (multiply, then add). Out of range: 0, so the tile's
    // weights dequantize to ±0 whatever stale codes the buffer holds.
    auto absmax_at = [&](int g) -> float {
        long long b;
        if (!block_of(g, b)) return 0.f;
        return w.nested_map[w.absmax[b]] * w.nested_scales[b >> 8] + w.offset;
    };

    // Dequantizes 8 codes (one 32-bit word of the code tile: byte i holds
    // element 2i in the high nibble, 2i+1 in the low one) into one 16-byte
    // chunk of W tile buffer `buf`, chunk j (0, 1) of this thread's run.
    // Out-of-range runs have absmax 0, so they store zeros (±0).
    const u32 dq_off0 = TRANS ? n128_off(dq_r, 2 * (tid & 7)) : k32_off(dq_r, 2 * (tid & 1));
    const u32 dq_off1 = TRANS ? n128_off(dq_r, 2 * (tid & 7) + 1) : k32_off(dq_r, 2 * (tid & 1) + 1);
    auto dequant8 = [&](u32 word, float am, int buf, int j) {
        // Byte offsets into the code book: 4 * code, one per byte lane.
        const u32 hi4 = (word >> 2) & 0x3c3c3c3cu;  // high nibbles (even elements)
        const u32 lo4 = (word << 2) & 0x3c3c3c3cu;  // low nibbles (odd elements)
        const unsigned char* lb = (const unsigned char*)lut;
        u32 p[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const u32 sel = 0x4440u + i;  // byte i, zero above
            const float e0 = *(const float*)(lb + __byte_perm(hi4, 0, sel));
            const float e1 = *(const float*)(lb + __byte_perm(lo4, 0, sel));
            p[i] = pack_bf16x2(e0 * am, e1 * am);
        }
        const u32 off = OFF_B + buf * B_BUF + (j ? dq_off1 : dq_off0);
        *(uint4*)(smem + off) = make_uint4(p[0], p[1], p[2], p[3]);
    };
    auto codes_of = [&](int g) -> uint2 {
        return *(const uint2*)(smem + OFF_C + (g % STAGES) * C_STAGE + tid * 8);
    };

    // Per-lane ldmatrix offsets (bytes within a stage / buffer).
    //   A (X tile, K32): matrices 0..3 = (rows 0-7, k 0-7), (rows 8-15, k 0-7),
    //     (rows 0-7, k 8-15), (rows 8-15, k 8-15) of a 16x16 block, which are
    //     the mma A registers a0..a3 (a0: row g, k 2t..; a1: row g+8; a2: k+8;
    //     a3: both; g = lane/4, t = lane%4). Lane l addresses row l & 15,
    //     chunk 2kk + (l >> 4). Block i (rows +16i = +8 lines, same p & 3) is
    //     +1024 bytes; kk = 1 (chunks +2) flips bit 1 of the slot: XOR 32.
    const u32 a_ld = k32_off(wm * 64 + (lane & 15), lane >> 4);
    //   B, forward (W tile [n][k], K32): non-transposed; matrices 0..3 =
    //     (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
    //     of a 16(n) x 16(k) block = b0, b1 of n-tile 2jp and b0, b1 of n-tile
    //     2jp+1 (b0: k 2t.., n g; b1: k 2t+8.., n g). Lane l addresses row
    //     n = (l & 7) + 8 (l >> 4), chunk 2kk + ((l >> 3) & 1). Pair jp is
    //     +1024 bytes; kk = 1: XOR 32.
    //   B, input grad (W tile [k][n], N128): transposed; matrices 0..3 =
    //     (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15);
    //     .trans hands lane l (k 2t, 2t+1; n g) = b0 of n-tile 2jp, etc. Lane
    //     l addresses row k = 16kk + (l & 15), chunk 8wn + 2jp + (l >> 4).
    //     kk = 1 is +16 rows = +4096 bytes (same swizzle); pair jp XORs the
    //     chunk with 2jp (c >> 3 = wn fixed): XOR 32 jp on the byte offset.
    const u32 b_ld = TRANS ? n128_off(lane & 15, 8 * wn + (lane >> 4))
                           : k32_off(wn * 64 + (lane & 7) + 8 * (lane >> 4), (lane >> 3) & 1);

    float acc[4][8][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

    // Fragments of one 16-wide k slice: A (4 m16 tiles), B (8 n8 tiles).
    struct Frags {
        u32 a[4][4], b[8][2];
    };
    auto load_frags = [&](Frags& f, int g, int kk) {
        const u32 a_st = OFF_A + (g % STAGES) * A_STAGE + a_ld;
        const u32 b_st = OFF_B + (g % B_BUFS) * B_BUF + b_ld;
        // Stage and buffer offsets are multiples of 8192, so the XORs (bits
        // 5 and 6) act on the in-tile offsets only.
#pragma unroll
        for (int i = 0; i < 4; i++)
            ldsm_x4(sbase + ((a_st + i * 1024) ^ (kk * 32)), f.a[i][0], f.a[i][1], f.a[i][2], f.a[i][3]);
#pragma unroll
        for (int jp = 0; jp < 4; jp++) {
            if (TRANS)
                ldsm_x4_trans(sbase + ((b_st + kk * 4096) ^ (jp * 32)), f.b[2 * jp][0], f.b[2 * jp][1],
                              f.b[2 * jp + 1][0], f.b[2 * jp + 1][1]);
            else
                ldsm_x4(sbase + ((b_st + jp * 1024) ^ (kk * 32)), f.b[2 * jp][0], f.b[2 * jp][1],
                        f.b[2 * jp + 1][0], f.b[2 * jp + 1][1]);
        }
    };
    auto mma_row = [&](const Frags& f, int i) {
#pragma unroll
        for (int j = 0; j < 8; j++) mma_bf16(acc[i][j], f.a[i], f.b[j][0], f.b[j][1]);
    };

    // Pipeline. Group g = {X tile g, codes of W tile g+1} (group "-1" =
    // codes of tile 0). Iteration kt multiplies tile kt in two k slices,
    // F0 (kk = 0) and F1 (kk = 1), and dequantizes tile kt+2:
    //
    //   F1 <- ldmatrix(tile kt, kk = 1)
    //   mma(F0)
    //   wait for group kt+1; barrier
    //   F0 <- ldmatrix(tile kt+1, kk = 0)
    //   mma(F1), interleaved with: issue group kt+STAGES (X stage kt % S,
    //     codes stage (kt+1) % S) and dequantize tile kt+2 (codes stage
    //     (kt+2) % S, from group kt+1) into W buffer kt % 2
    //
    // Only ldmatrix and mma stand between two barriers' critical paths; the
    // dequantization overlaps the mma after the barrier. Hazards, all
    // separated by barrier kt:
    //   X stage kt % S: both slices of tile kt are read before it; group
    //     kt+STAGES overwrites it after.
    //   code stage (kt+1) % S: read (tile kt+1's dequantization) in
    //     iteration kt-1, after barrier kt-1; overwritten after barrier kt.
    //     Code stage (kt+2) % S (read now) is no pending group's target:
    //     those hold codes of tiles kt+3 .. kt+STAGES+1.
    //   W buffer kt % 2 holds tile kt, whose slices are both in registers
    //     before barrier kt (F1 is loaded just before it); tile kt+2 is
    //     written there after barrier kt and first read after barrier kt+1.
    //   W buffer (kt+1) % 2 (tile kt+1) was written after barrier kt-1 and
    //     is read after barrier kt (F0) and before barrier kt+1 (F1).
    auto mma_row_dequant = [&](const Frags& f, int i, uint2 cw, float am, int buf) {
        // The i-th quarter of mma(f) with a share of the dequantization.
        mma_row(f, i);
        if (i == 0) dequant8(cw.x, am, buf, 0);
        if (i == 2) dequant8(cw.y, am, buf, 1);
    };

    // Prologue: codes of tile 0, then groups 0 .. STAGES-2.
    load_codes(0);
    cp_async_commit();
#pragma unroll
    for (int g = 0; g < STAGES - 1; g++) load_group(g);

    // absmax pipeline: iteration kt loads the absmax code and nested scale
    // of tile kt+3 into registers (aq, as_) and iteration kt+1 finishes the
    // absmax from shared memory, just before dequantizing that tile. A load
    // is thus consumed one iteration (one barrier and 64 mma per warp) after
    // it is issued, and no value is copied between registers in between (a
    // copy would wait for the load).
    const float am0 = absmax_at(0), am1 = absmax_at(1);
    long long pb;
    u32 aq = 0;
    float as_ = 0.f;
    if (block_of(2, pb)) {  // tile 2, finished in iteration 0
        aq = w.absmax[pb];
        as_ = w.nested_scales[pb >> 8];
    }

    cp_async_wait<STAGES - 2>();  // groups -1 and 0: codes of tiles 0, 1, X tile 0
    __syncthreads();              // everyone's, the code book and nested_map
    {
        const uint2 c0w = codes_of(0), c1w = codes_of(1);
        dequant8(c0w.x, am0, 0, 0);
        dequant8(c0w.y, am0, 0, 1);
        dequant8(c1w.x, am1, 1, 0);  // tile 1 == T: stale codes, absmax 0
        dequant8(c1w.y, am1, 1, 1);
    }
    __syncthreads();         // W buffers 0 and 1
    load_group(STAGES - 1);  // its codes go to stage 0 (tile 0's, consumed)
    Frags f0, f1;
    load_frags(f0, 0, 0);

    for (int kt = 0; kt < T; kt++) {
        load_frags(f1, kt, 1);
#pragma unroll
        for (int i = 0; i < 4; i++) mma_row(f0, i);

        // Committed: groups -1 .. kt+STAGES-1; group kt+1 must be complete.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        if (kt + 1 < T) load_frags(f0, kt + 1, 0);

        // absmax pipeline (see above): finish tile kt+2's, fetch tile kt+3's.
        long long pb2;
        const float am2 = block_of(kt + 2, pb2) ? nmap[aq] * as_ + w.offset : 0.f;
        if (block_of(kt + 3, pb)) {
            aq = w.absmax[pb];
            as_ = w.nested_scales[pb >> 8];
        }
        const uint2 cw = codes_of(kt + 2);
        const int buf = (kt + 2) % B_BUFS;

        // Tile kt+2 >= T: stale codes, absmax 0, a buffer nobody reads.
        mma_row_dequant(f1, 0, cw, am2, buf);
        load_group(kt + STAGES);
#pragma unroll
        for (int i = 1; i < 4; i++) mma_row_dequant(f1, i, cw, am2, buf);
    }
    cp_async_wait<0>();  // only empty groups can be left; keep it tidy

    // Epilogue: acc[i][j] is the 16x8 tile at rows wm*64 + 16i, columns
    // wn*64 + 8j; c0, c1 at (row g, columns 2t, 2t+1), c2, c3 at row g+8.
    const int g = lane >> 2, t4 = lane & 3;
    if (e.r > 0) {
        // The LoRA term, EPI_R ranks at a time: the block's rows of la and
        // columns of lb staged (rounded to bf16, zero out of range) in the
        // shared memory the main loop is done with.
        float* las = (float*)smem;      // [BM][EPI_LD]
        float* lbs = las + BM * EPI_LD;  // [BN][EPI_LD]
        for (int r0 = 0; r0 < e.r; r0 += EPI_R) {
            __syncthreads();  // every warp is past its last read of smem
            for (int q = tid; q < BM * EPI_R; q += THREADS) {
                const int row = q / EPI_R, r = r0 + q % EPI_R, m = m0 + row;
                const float v = (m < M && r < e.r) ? e.s * e.la[(long long)m * e.r + r] : 0.f;
                las[row * EPI_LD + q % EPI_R] = bf16_to_f32(f32_to_bf16(v));
            }
            // Consecutive threads take consecutive addresses of lb: columns
            // fastest when lb is [r, width] (the input gradient's lora_A).
            const bool cols_fast = e.lb_n == 1;
            for (int q = tid; q < BN * EPI_R; q += THREADS) {
                const int col = cols_fast ? q % BN : q / EPI_R;
                const int rr = cols_fast ? q / BN : q % EPI_R, r = r0 + rr, n = c0 + col;
                const float v =
                    (n < width && r < e.r) ? e.lb[(long long)n * e.lb_n + (long long)r * e.lb_r] : 0.f;
                lbs[col * EPI_LD + rr] = bf16_to_f32(f32_to_bf16(v));
            }
            __syncthreads();
#pragma unroll 1
            for (int r = 0; r < EPI_R; r++) {
                float av[4][2], bv[8][2];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        av[i][h] = las[(wm * 64 + i * 16 + g + h * 8) * EPI_LD + r];
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int c = 0; c < 2; c++)
                        bv[j][c] = lbs[(wn * 64 + j * 8 + t4 * 2 + c) * EPI_LD + r];
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int j = 0; j < 8; j++)
#pragma unroll
                        for (int h = 0; h < 2; h++)
#pragma unroll
                            for (int c = 0; c < 2; c++)
                                acc[i][j][2 * h + c] = fmaf(av[i][h], bv[j][c], acc[i][j][2 * h + c]);
            }
        }
    }
    const bool pairs = (width & 1) == 0;  // (m*width + n) even: 4-byte aligned
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int m = m0 + wm * 64 + i * 16 + g + h * 8;
            if (m >= M) continue;
            bf16_t* yr = y + (long long)m * width;
            const bf16_t* ar = e.addend ? e.addend + (long long)m * width : nullptr;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int n = c0 + wn * 64 + j * 8 + t4 * 2;
                float v[2] = {acc[i][j][2 * h], acc[i][j][2 * h + 1]};
#pragma unroll
                for (int c = 0; c < 2; c++) {
                    if (n + c >= width) continue;
                    if (ar) v[c] += bf16_to_f32(ar[n + c]);
                    if (e.col_scale) v[c] *= e.col_scale[n + c];
                }
                const bf16_t lo = f32_to_bf16(v[0]);
                const bf16_t hi = f32_to_bf16(v[1]);
                if (pairs && n + 1 < width) {
                    *(u32*)(yr + n) = (u32)lo | ((u32)hi << 16);
                } else {
                    if (n < width) yr[n] = lo;
                    if (n + 1 < width) yr[n + 1] = hi;
                }
            }
        }
}

// The epilogue's arguments (see Epi), after the weight's: la, lb, r, lb_n,
// lb_r, s, addend, col_scale; null pointers (and r = 0) for absent pieces.
#define EPI_PARAMS                                                                          \
    const float *la, const float *lb, int r, int lb_n, int lb_r, float s, const bf16_t *addend, \
        const float *col_scale
#define EPI_ARGS {la, lb, r, lb_n, lb_r, s, addend, col_scale}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
nf4_gemm_fwd(const bf16_t* x, const unsigned char* packed, const unsigned char* absmax,
             const float* nested_scales, const float* nested_map, float offset, EPI_PARAMS,
             bf16_t* y, int M, int N, int K) {
    Nf4 w = {packed, absmax, nested_scales, nested_map, offset};
    nf4_gemm<false>(x, w, Epi EPI_ARGS, y, M, N, K);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
nf4_gemm_dgrad(const bf16_t* dy, const unsigned char* packed, const unsigned char* absmax,
               const float* nested_scales, const float* nested_map, float offset, EPI_PARAMS,
               bf16_t* dx, int M, int N, int K) {
    Nf4 w = {packed, absmax, nested_scales, nested_map, offset};
    nf4_gemm<true>(dy, w, Epi EPI_ARGS, dx, M, N, K);
}

// ------------------------------------------------------- whole-weight dequant
//
// dequant(W) into global memory, [N * K] in W's order, for products that
// go through cuBLAS instead of the kernel above (faster on sm_90 at every
// training shape measured: docs/GPU.md). Numerics as the tiles':
// NF4[code]·absmax in f32 (absmax multiply-then-add), rounded to nearest
// even for bf16, kept for f32 (f32 compute). Each thread turns one 32-bit
// word of codes (8 weights, inside one 64-block) into one 16-byte store
// (two for f32); n8 = N·K / 8. The code book is read from
// shared memory: its 16 floats sit in 16 distinct banks, so lanes reading
// different codes never conflict (the constant bank would serialize them).
template <typename TO>
__device__ void nf4_dequantize_impl(const unsigned char* packed, const unsigned char* absmax,
                                    const float* nested_scales, const float* nested_map, float offset,
                                    TO* out, long long n8) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4[threadIdx.x];
    __syncthreads();
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n8;
         i += (long long)gridDim.x * blockDim.x) {
        const long long b = i >> 3;  // 8 words of codes per 64-block
        const float am = nested_map[absmax[b]] * nested_scales[b >> 8] + offset;
        const u32 word = ((const u32*)packed)[i];
        float v[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Byte j: element 2j in the high nibble, 2j + 1 in the low one.
            const u32 byte = (word >> (8 * j)) & 0xffu;
            v[2 * j] = lut[byte >> 4] * am;
            v[2 * j + 1] = lut[byte & 15u] * am;
        }
        if constexpr (sizeof(TO) == 2) {
            ((uint4*)out)[i] = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]),
                                          pack_bf16x2(v[4], v[5]), pack_bf16x2(v[6], v[7]));
        } else {
            ((float4*)out)[2 * i] = make_float4(v[0], v[1], v[2], v[3]);
            ((float4*)out)[2 * i + 1] = make_float4(v[4], v[5], v[6], v[7]);
        }
    }
}
extern "C" __global__ void nf4_dequantize(const unsigned char* packed, const unsigned char* absmax,
                                          const float* nested_scales, const float* nested_map,
                                          float offset, bf16_t* out, long long n8) {
    nf4_dequantize_impl(packed, absmax, nested_scales, nested_map, offset, out, n8);
}
// The same values unrounded (f32 compute: the CPU's dequantize_into).
extern "C" __global__ void nf4_dequantize_f32(const unsigned char* packed, const unsigned char* absmax,
                                              const float* nested_scales, const float* nested_map,
                                              float offset, float* out, long long n8) {
    nf4_dequantize_impl(packed, absmax, nested_scales, nested_map, offset, out, n8);
}

// y[m, n] = scale · Σ_k x[m, k] · W[n, k] (+ beta · y[m, n] when beta ≠ 0)
// for at most NF4_GEMV_MAX_M rows of x: generation's products, where the
// dequantized copy (written and read again whole for one token) would cost
// 2.5x the 4-bit codes' reading. A warp per weight row n: its lanes take
// one 32-bit word of codes (8 weights, inside one 64-block) at a time,
// dequantize as nf4_dequantize{_f32} does (for bf16 x, bf16 weights bit for
// bit those the GEMM path multiplies; for f32 x, f32 compute's unrounded
// weights) and multiply in f32; the warp's sums add by shuffles. x and y
// are row-major, k a multiple of 64.
#define NF4_GEMV_MAX_M 8
template <typename TI, typename TO>
__device__ void nf4_gemv(const TI* x, int m, int k, const unsigned char* packed, const unsigned char* absmax,
                         const float* nested_scales, const float* nested_map, float offset, TO* y, int n,
                         float scale, float beta) {
    constexpr bool BF16_X = sizeof(TI) == 2;
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = NF4[threadIdx.x];
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int row = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    if (row >= n) return;
    const int words = k / 8;
    const u32* codes = (const u32*)packed + (long long)row * words;
    float acc[NF4_GEMV_MAX_M];
#pragma unroll
    for (int i = 0; i < NF4_GEMV_MAX_M; i++) acc[i] = 0.f;
    for (int w = lane; w < words; w += 32) {
        const long long b = ((long long)row * words + w) >> 3;  // its 64-block
        const float am = nested_map[absmax[b]] * nested_scales[b >> 8] + offset;
        const u32 word = codes[w];
        float wv[8];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Byte j: element 2j in the high nibble, 2j + 1 in the low one.
            const u32 byte = (word >> (8 * j)) & 0xffu;
            wv[2 * j] = lut[byte >> 4] * am;
            wv[2 * j + 1] = lut[byte & 15u] * am;
            if constexpr (BF16_X) {
                wv[2 * j] = bf16_to_f32(f32_to_bf16(wv[2 * j]));
                wv[2 * j + 1] = bf16_to_f32(f32_to_bf16(wv[2 * j + 1]));
            }
        }
#pragma unroll
        for (int i = 0; i < NF4_GEMV_MAX_M; i++) {
            if (i >= m) break;
            float xv[8];
            if constexpr (BF16_X) {
                const uint4 q = *(const uint4*)(x + (long long)i * k + 8 * w);
                const u32 xs[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    xv[2 * j] = bf16_to_f32((bf16_t)(xs[j] & 0xffffu));
                    xv[2 * j + 1] = bf16_to_f32((bf16_t)(xs[j] >> 16));
                }
            } else {
                const float4* p = (const float4*)(x + (long long)i * k + 8 * w);
                const float4 lo = p[0], hi = p[1];
                const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                for (int j = 0; j < 8; j++) xv[j] = v[j];
            }
#pragma unroll
            for (int j = 0; j < 8; j++) acc[i] += xv[j] * wv[j];
        }
    }
#pragma unroll
    for (int i = 0; i < NF4_GEMV_MAX_M; i++) {
        if (i >= m) break;
        float s = acc[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) {
            const size_t at = (size_t)i * n + row;
            st(y, at, beta != 0.f ? scale * s + beta * ld(y, at) : scale * s);
        }
    }
}
#define NF4_GEMV(name, TI, TO)                                                                              \
    extern "C" __global__ void name(const TI* x, int m, int k, const unsigned char* packed,                 \
                                    const unsigned char* absmax, const float* nested_scales,               \
                                    const float* nested_map, float offset, TO* y, int n, float scale,      \
                                    float beta) {                                                          \
        nf4_gemv(x, m, k, packed, absmax, nested_scales, nested_map, offset, y, n, scale, beta);            \
    }
NF4_GEMV(nf4_gemv_f32, bf16_t, float)
NF4_GEMV(nf4_gemv_bf16, bf16_t, bf16_t)
NF4_GEMV(nf4_gemv_f32x, float, float)  // f32 compute
