// CUDA kernels of kernels/cuda/ on the CPU, for the emulators
// (scripts/emulate_*.cpp): a check of index math, barriers, warp exchanges
// and fragment layouts that needs no GPU. Blocks run one after another; the
// threads of a block run concurrently (std::thread), __syncthreads and every
// warp-wide exchange (shuffles, ldmatrix, mma) through std::barrier. Dynamic
// shared memory is allocated per block at exactly the launch's size and
// filled with 0xff bytes (bf16 NaN), so AddressSanitizer catches any access
// past it and a read of a never-written byte poisons the result.
//
// The PTX primitives of common.cuh (mma.sync m16n8k16, ldmatrix, cp.async,
// cvt.rn.bf16x2) have scalar twins here that reproduce their per-lane
// semantics from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type", "ldmatrix"): each lane publishes its operands, then
// computes exactly its own registers from all lanes' operands. ldmatrix also counts bank
// conflicts (8 row addresses of one matrix in fewer than 8 distinct 16-byte
// bank groups).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
using std::size_t;

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __constant__ static
#define __restrict__ __restrict
#define GRAFT_EMULATE_PTX

struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
static float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static int min(int a, int b) { return a < b ? a : b; }
static int max(int a, int b) { return a > b ? a : b; }
[[noreturn]] static void __trap() {
    fprintf(stderr, "__trap() in block (%u, %u) thread %u\n", blockIdx.x, blockIdx.y, threadIdx.x);
    abort();
}
// prmt: byte i of the result is byte (s >> 4i) & 7 of the pair (x low, y high).
static unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    assert((s & 0x8888u) == 0);  // no sign-replicate selectors: not twinned
    const uint64_t v = (uint64_t)y << 32 | x;
    unsigned r = 0;
    for (int i = 0; i < 4; ++i) r |= (unsigned)(v >> (8 * ((s >> (4 * i)) & 7)) & 0xff) << (8 * i);
    return r;
}
static float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
static float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
static unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }

static std::unique_ptr<std::barrier<>> g_block_bar;
static std::unique_ptr<std::barrier<>> g_warp_bar[32];
static void __syncthreads() { g_block_bar->arrive_and_wait(); }

// Warp-wide exchange: every lane of the warp publishes `mine` and gets all
// 32 lanes' values; it must call warp_done() once it has read them.
static unsigned char g_xchg[32][32][64];
template <class T> static const T* warp_exchange(const T& mine) {
    static_assert(sizeof(T) <= 64, "exchange slot");
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    std::memcpy(g_xchg[w][lane], &mine, sizeof(T));
    g_warp_bar[w]->arrive_and_wait();
    static thread_local T all[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&all[l], g_xchg[w][l], sizeof(T));
    return all;
}
static void warp_done() { g_warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }

// CUDA's reciprocal square root (the device's is within 2 ulp of this).
static float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

template <class T> T __shfl_xor_sync(unsigned mask, T v, int o) {
    (void)mask;
    T r = warp_exchange(v)[(threadIdx.x & 31) ^ o];
    warp_done();
    return r;
}

// The block's dynamic shared memory; smem_u32 addresses are offsets into it.
static unsigned char* g_smem = nullptr;
static size_t g_smem_size = 0;
#define DYNAMIC_SMEM(name) unsigned char* const name = g_smem
static unsigned smem_u32(const void* p) {
    const unsigned char* c = (const unsigned char*)p;
    assert(c >= g_smem && c < g_smem + g_smem_size);
    return (unsigned)(c - g_smem);
}
static unsigned dynamic_smem_bytes() { return (unsigned)g_smem_size; }

// cp.async: each thread's copies land in shared memory only when a
// cp.async.wait_group retires their group (all but the newest N committed
// groups), never earlier, so a wait that is missing or too loose leaves
// stale bytes that poison the result. The source is read at issue (global
// inputs do not change during a kernel): src_bytes from src, zeros to 16.
struct AsyncCopy { unsigned dst; unsigned char bytes[16]; };
thread_local std::vector<AsyncCopy> t_async_open;
thread_local std::vector<std::vector<AsyncCopy>> t_async_groups;
static void cp_async16(unsigned dst, const void* src, unsigned src_bytes) {
    assert(dst % 16 == 0 && dst + 16 <= g_smem_size && src_bytes <= 16);
    assert(src_bytes == 0 || (uintptr_t)src % 16 == 0);  // cp.async.cg needs 16-byte sources
    AsyncCopy c{dst, {}};
    std::memcpy(c.bytes, src, src_bytes);
    t_async_open.push_back(c);
}
static void cp_async_commit() {
    t_async_groups.push_back(std::move(t_async_open));
    t_async_open.clear();
}
template <int N> static void cp_async_wait() {
    while (t_async_groups.size() > (size_t)N) {
        for (const AsyncCopy& c : t_async_groups.front()) std::memcpy(g_smem + c.dst, c.bytes, 16);
        t_async_groups.erase(t_async_groups.begin());
    }
}

// cvt.rn.bf16x2.f32: both halves rounded to nearest even, `lo` low.
static unsigned pack_bf16x2(float lo, float hi) {
    auto rn = [](float f) {
        unsigned u = __float_as_uint(f);
        if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // canonical NaN
        return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    };
    return rn(lo) | rn(hi) << 16;
}

static uint16_t half_of(unsigned r, int hi) { return (uint16_t)(hi ? r >> 16 : r & 0xffffu); }
static float bf16_bits_to_f32(uint16_t h) { return __uint_as_float((unsigned)h << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, with g = lane/4,
// t = lane%4: lane (g, t) holds a0 = A(g, 2t..2t+1), a1 = A(g+8, 2t..),
// a2 = A(g, 2t+8..), a3 = A(g+8, 2t+8..), b0 = B(2t..2t+1, g),
// b1 = B(2t+8.., g), c0, c1 = C(g, 2t..2t+1), c2, c3 = C(g+8, 2t..).
// Products of bf16 values are exact in f32; they are summed in f32 in k
// order (the hardware's order is unspecified).
static void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    struct F { unsigned a[4], b[2]; };
    const F mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
    const F* all = warp_exchange(mine);
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), n = 2 * t + (e & 1);
        float sum = 0.f;
        for (int k = 0; k < 16; ++k) {
            const float av = bf16_bits_to_f32(half_of(all[(row % 8) * 4 + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)], k & 1));
            const float bv = bf16_bits_to_f32(half_of(all[n * 4 + (k % 8) / 2].b[k >= 8], k & 1));
            sum += av * bv;
        }
        c[e] += sum;
    }
    warp_done();
}

static std::atomic<long> g_ldsm_phases{0}, g_ldsm_conflicts{0};
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the row
// address of row l%8 of matrix l/8 (16 bytes, 16-aligned); register m of
// lane l gets matrix m's (row l/4, columns 2(l%4), 2(l%4)+1), or with
// .trans (rows 2(l%4), 2(l%4)+1, column l/4), lower index in the low half.
static void ldsm(unsigned addr, bool trans, unsigned* r) {
    assert(addr % 16 == 0 && addr + 16 <= g_smem_size);
    const unsigned* all = warp_exchange(addr);
    const int lane = threadIdx.x & 31;
    auto elem = [&](int row_lane, int col) {
        uint16_t h;
        std::memcpy(&h, g_smem + all[row_lane] + 2 * col, 2);
        return (unsigned)h;
    };
    for (int m = 0; m < 4; ++m) {
        if (!trans) r[m] = elem(8 * m + lane / 4, 2 * (lane % 4)) | elem(8 * m + lane / 4, 2 * (lane % 4) + 1) << 16;
        else r[m] = elem(8 * m + 2 * (lane % 4), lane / 4) | elem(8 * m + 2 * (lane % 4) + 1, lane / 4) << 16;
    }
    if (lane == 0)
        for (int m = 0; m < 4; ++m) {
            unsigned seen = 0;
            for (int i = 0; i < 8; ++i) seen |= 1u << ((all[8 * m + i] / 16) % 8);
            ++g_ldsm_phases;
            if (seen != 0xffu) ++g_ldsm_conflicts;
        }
    warp_done();
}
static void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    unsigned r[4];
    ldsm(addr, false, r);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
static void ldsm_x4_trans(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    unsigned r[4];
    ldsm(addr, true, r);
    r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

// Runs kernel `k` on a grid of blocks of `block` threads, each block with
// `smem` bytes of dynamic shared memory.
static void launch(Dim3 grid, unsigned block, size_t smem, const std::function<void()>& k) {
    assert(block % 32 == 0 && block <= 1024 && grid.x >= 1 && grid.y >= 1);
    gridDim = grid;
    gridDim.z = 1;
    blockDim.x = block;
    for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
            std::vector<unsigned char> shared(smem, 0xff);
            g_smem = shared.data();
            g_smem_size = smem;
            g_block_bar = std::make_unique<std::barrier<>>(block);
            for (unsigned w = 0; w < block / 32; ++w) g_warp_bar[w] = std::make_unique<std::barrier<>>(32);
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < block; ++t)
                ts.emplace_back([&, t, bx, by] {
                    threadIdx.x = t;
                    t_async_open.clear();
                    t_async_groups.clear();
                    blockIdx.x = bx;
                    blockIdx.y = by;
                    k();
                });
            for (auto& t : ts) t.join();
            g_smem = nullptr;
        }
}
static void launch(unsigned grid, unsigned block, const std::function<void()>& k) { launch(Dim3{grid, 1, 1}, block, 0, k); }

// Test helpers shared by the emulators.
static uint64_t rs = 88172645463325252ull;
static double unit() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return (rs >> 11) * (1.0 / 9007199254740992.0); }
static float uni(float lo, float hi) { return (float)(lo + (hi - lo) * unit()); }
static size_t below(size_t n) { return (size_t)(unit() * n) % n; }
static int fails = 0;
static void expect(bool ok, const char* what, double e) {
    printf("%s %s: %.3g\n", ok ? "ok  " : "FAIL", what, e);
    fflush(stdout);
    if (!ok) ++fails;
}
// ||a - b|| / max(||b||, floor): a floor for outputs that can vanish, whose
// reference is then only rounding noise.
static double rel_l2(const std::vector<double>& a, const std::vector<double>& b, double floor = 0) {
    double d = 0, n = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
        d += (a[i] - b[i]) * (a[i] - b[i]); n += b[i] * b[i];
    }
    return std::sqrt(d) / std::max({std::sqrt(n), floor, 1e-300});
}
