// The NF4 GEMM (kernels/cuda/nf4_gemm.cu) on the CPU by emulation
// (scripts/emulate_cuda.h: threads and barriers for the block, scalar twins
// of mma.sync, ldmatrix, cp.async and cvt.rn.bf16x2), forward and input
// gradient, with and without its epilogue (LoRA term, addend, column
// scale), and the GEMV of generation's few rows, against a double-precision
// reference on the same bf16 inputs and the same dequantized weights. The weights are random NF4 codes, absmax
// codes and scales: any bytes are a valid NF4 tensor. Every output starts
// as NaN; relative L2 above 1e-2 fails. About a minute on the 2-core CPU
// machine:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined \
//       -ffp-contract=off -pthread scripts/emulate_nf4_gemm.cpp -o /tmp/emulate_nf4 && /tmp/emulate_nf4
#include "emulate_cuda.h"

// The source as NVRTC sees it: common.cuh first.
#include "../kernels/cuda/common.cuh"
#include "../kernels/cuda/nf4_gemm.cu"

struct Case {
    int m, n, k, r;
    bool trans, lora, addend, scale;
};

// W [n, k] in NF4: codes two to a byte (even index high), one absmax code
// per 64 values, one nested scale per 256 blocks; `w` the values the
// kernels dequantize to (NF4[code]·absmax in f32, no FMA, rounded to bf16),
// `w32` the same unrounded (f32 compute's).
struct Weights {
    std::vector<unsigned char> packed, absmax;
    std::vector<float> nested_scales, nested_map;
    float offset = 0.05f;
    std::vector<double> w;
    std::vector<float> w32;
};
static Weights random_weights(int n, int k) {
    const size_t nw = (size_t)n * k, blocks = nw / 64;
    Weights r{std::vector<unsigned char>(nw / 2), std::vector<unsigned char>(blocks),
              std::vector<float>((blocks + 255) / 256), std::vector<float>(256), 0.05f, std::vector<double>(nw),
              std::vector<float>(nw)};
    for (auto& b : r.packed) b = (unsigned char)below(256);
    for (auto& b : r.absmax) b = (unsigned char)below(256);
    for (auto& v : r.nested_scales) v = uni(0.001f, 0.01f);
    for (auto& v : r.nested_map) v = uni(-1.f, 1.f);
    for (size_t e = 0; e < nw; ++e) {
        const int code = e % 2 ? r.packed[e / 2] & 15 : r.packed[e / 2] >> 4;
        const float am = r.nested_map[r.absmax[e / 64]] * r.nested_scales[e / 64 / 256] + r.offset;
        r.w32[e] = NF4[code] * am;
        r.w[e] = bf16_to_f32(f32_to_bf16(r.w32[e]));
    }
    return r;
}

static void run(const Case& c) {
    const size_t nw = (size_t)c.n * c.k;
    Weights wt = random_weights(c.n, c.k);
    auto &packed = wt.packed, &absmax = wt.absmax;
    auto &nested_scales = wt.nested_scales, &nested_map = wt.nested_map;
    const float offset = wt.offset;
    const std::vector<double>& w = wt.w;
    const int inner = c.trans ? c.n : c.k, width = c.trans ? c.k : c.n;
    std::vector<bf16_t> x((size_t)c.m * inner), add((size_t)c.m * width);
    for (auto& v : x) v = f32_to_bf16(uni(-1.f, 1.f));
    for (auto& v : add) v = f32_to_bf16(uni(-1.f, 1.f));
    // lora b: [width, r] in the forward, [r, width] in the input gradient.
    std::vector<float> la((size_t)c.m * c.r), lb((size_t)width * c.r), cs(width);
    for (auto& v : la) v = uni(-1.f, 1.f);
    for (auto& v : lb) v = uni(-0.5f, 0.5f);
    for (auto& v : cs) v = uni(0.5f, 1.5f);
    const float s = 16.f / std::sqrt(20.f);  // rsLoRA's: not a power of two
    const int lb_n = c.trans ? 1 : c.r, lb_r = c.trans ? width : 1;
    auto rb = [](float v) { return (double)bf16_to_f32(f32_to_bf16(v)); };
    std::vector<double> want((size_t)c.m * width);
    for (int i = 0; i < c.m; ++i)
        for (int j = 0; j < width; ++j) {
            double acc = 0;
            for (int p = 0; p < inner; ++p) {
                const size_t we = c.trans ? (size_t)p * c.k + j : (size_t)j * c.k + p;
                acc += bf16_to_f32(x[(size_t)i * inner + p]) * w[we];
            }
            if (c.lora)
                for (int q = 0; q < c.r; ++q)
                    acc += rb(s * la[(size_t)i * c.r + q]) * rb(lb[(size_t)j * lb_n + (size_t)q * lb_r]);
            if (c.addend) acc += bf16_to_f32(add[(size_t)i * width + j]);
            if (c.scale) acc *= cs[j];
            want[(size_t)i * width + j] = acc;
        }
    std::vector<bf16_t> y((size_t)c.m * width, 0x7fc0);  // NaN: every output must be written
    const Dim3 grid{(unsigned)((width + BN - 1) / BN), (unsigned)((c.m + BM - 1) / BM), 1};
    launch(grid, THREADS, SMEM_BYTES, [&] {
        const float* la_ = c.lora ? la.data() : nullptr;
        const float* lb_ = c.lora ? lb.data() : nullptr;
        const int r = c.lora ? c.r : 0;
        const bf16_t* ad = c.addend ? add.data() : nullptr;
        const float* sc = c.scale ? cs.data() : nullptr;
        if (c.trans)
            nf4_gemm_dgrad(x.data(), packed.data(), absmax.data(), nested_scales.data(), nested_map.data(),
                           offset, la_, lb_, r, lb_n, lb_r, s, ad, sc, y.data(), c.m, c.n, c.k);
        else
            nf4_gemm_fwd(x.data(), packed.data(), absmax.data(), nested_scales.data(), nested_map.data(),
                         offset, la_, lb_, r, lb_n, lb_r, s, ad, sc, y.data(), c.m, c.n, c.k);
    });
    std::vector<double> got(y.size());
    for (size_t i = 0; i < y.size(); ++i) got[i] = bf16_to_f32(y[i]);
    char what[160];
    // The whole-weight dequantization (for cuBLAS): every value bit-exact
    // with the tiles' numerics above, on a grid smaller than the weight so
    // the grid-stride loop turns over.
    std::vector<bf16_t> wd(nw, 0x7fc0);
    launch(Dim3{2, 1, 1}, 64, 0, [&] {
        nf4_dequantize(packed.data(), absmax.data(), nested_scales.data(), nested_map.data(), offset, wd.data(),
                       (long long)(nw / 8));
    });
    size_t differ = 0;
    for (size_t e = 0; e < nw; ++e) differ += bf16_to_f32(wd[e]) != w[e] || std::isnan(bf16_to_f32(wd[e]));
    snprintf(what, sizeof what, "nf4 dequantize n=%d k=%d: values that differ", c.n, c.k);
    expect(differ == 0, what, (double)differ);
    std::vector<float> wd32(nw, NAN);
    launch(Dim3{3, 1, 1}, 64, 0, [&] {
        nf4_dequantize_f32(packed.data(), absmax.data(), nested_scales.data(), nested_map.data(), offset,
                           wd32.data(), (long long)(nw / 8));
    });
    differ = 0;
    for (size_t e = 0; e < nw; ++e) differ += std::memcmp(&wd32[e], &wt.w32[e], 4) != 0;
    snprintf(what, sizeof what, "nf4 dequantize f32 n=%d k=%d: values that differ", c.n, c.k);
    expect(differ == 0, what, (double)differ);
    snprintf(what, sizeof what, "nf4 %s m=%d n=%d k=%d r=%d lora=%d addend=%d scale=%d",
             c.trans ? "dgrad" : "fwd  ", c.m, c.n, c.k, c.r, c.lora, c.addend, c.scale);
    const double e = rel_l2(got, want);
    expect(e < 1e-2, what, e);
}

// The GEMV of generation's few rows (nf4_gemv_*): y = scale·x·Wᵀ, or plus
// beta·y, to f32 and bf16, against the double reference on the same
// dequantized weights; rows of W not a multiple of a block's 8 warps, and
// words of codes not a multiple of the warp's 32 lanes. TI = float: f32 x
// against f32 compute's unrounded weights (nf4_gemv_f32x).
template <typename TO, typename TI = bf16_t>
static void run_gemv(int m, int n, int k, float beta) {
    constexpr bool F32X = sizeof(TI) == 4;
    Weights wt = random_weights(n, k);
    std::vector<TI> x((size_t)m * k);
    for (size_t i = 0; i < x.size(); ++i) st(x.data(), i, uni(-1.f, 1.f));
    std::vector<TO> y((size_t)m * n);
    std::vector<double> want(y.size());
    const float scale = 0.75f;
    for (size_t i = 0; i < y.size(); ++i) {
        const float y0 = uni(-1.f, 1.f);
        st(y.data(), i, beta != 0.f ? y0 : NAN);  // beta 0: y is not read
        const double prior = beta != 0.f ? (double)ld(y.data(), i) : 0.0;
        double acc = 0;
        for (int p = 0; p < k; ++p) {
            const size_t e = (i % n) * k + p;
            acc += (double)ld(x.data(), i / n * k + p) * (F32X ? (double)wt.w32[e] : wt.w[e]);
        }
        want[i] = scale * acc + beta * prior;
    }
    launch(Dim3{(unsigned)((n + 7) / 8), 1, 1}, 256, 0, [&] {
        if constexpr (F32X)
            nf4_gemv_f32x(x.data(), m, k, wt.packed.data(), wt.absmax.data(), wt.nested_scales.data(),
                          wt.nested_map.data(), wt.offset, y.data(), n, scale, beta);
        else if constexpr (sizeof(TO) == 4)
            nf4_gemv_f32(x.data(), m, k, wt.packed.data(), wt.absmax.data(), wt.nested_scales.data(),
                         wt.nested_map.data(), wt.offset, y.data(), n, scale, beta);
        else
            nf4_gemv_bf16(x.data(), m, k, wt.packed.data(), wt.absmax.data(), wt.nested_scales.data(),
                          wt.nested_map.data(), wt.offset, y.data(), n, scale, beta);
    });
    std::vector<double> got(y.size());
    for (size_t i = 0; i < y.size(); ++i) got[i] = ld(y.data(), i);
    char what[160];
    snprintf(what, sizeof what, "nf4 gemv %s m=%d n=%d k=%d beta=%g",
             F32X ? "f32x" : (sizeof(TO) == 4 ? "f32 " : "bf16"), m, n, k, beta);
    const double e = rel_l2(got, want);
    expect(e < (sizeof(TO) == 4 ? 1e-5 : 1e-2), what, e);
}

int main() {
    // Ragged m and output width against the 256 x 128 tile; ranks under, at
    // and past one 16-rank staging round.
    const Case cases[] = {
        {37, 200, 192, 4, false, false, false, false},
        {37, 200, 192, 4, true, false, false, false},
        {37, 200, 192, 4, false, true, true, true},
        {37, 200, 192, 4, true, true, true, true},
        // An odd width: scalar stores, and X rows that are not 16-byte runs.
        {37, 201, 192, 4, false, true, true, true},
        {37, 201, 192, 4, true, true, true, true},
        {300, 136, 128, 20, false, true, false, false},
        {300, 136, 128, 20, true, true, false, false},
        {300, 136, 128, 16, false, false, true, true},
        {261, 264, 256, 20, true, true, true, true},
    };
    for (const Case& c : cases) run(c);
    run_gemv<float>(1, 37, 192, 0.f);
    run_gemv<float>(3, 200, 2112, 1.f);
    run_gemv<bf16_t>(8, 77, 576, 0.f);
    run_gemv<bf16_t>(5, 64, 64, 1.f);
    run_gemv<float, float>(1, 37, 192, 0.f);
    run_gemv<float, float>(8, 77, 2112, 1.f);
    printf("ldmatrix bank conflicts: %ld of %ld phases\n", g_ldsm_conflicts.load(), g_ldsm_phases.load());
    printf("%d failures\n", fails);
    return fails != 0;
}
