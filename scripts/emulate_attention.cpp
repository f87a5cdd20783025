// The attention kernels (kernels/cuda/attention.cu) on the CPU by emulation
// (scripts/emulate_cuda.h: threads and barriers for the block, scalar twins
// of mma.sync/ldmatrix with their per-lane fragment layouts), against a
// double-precision reference computed from the same bf16 inputs: forward
// (out, lse) and backward (dq, dk, dv from the emulated forward's out and
// lse) on ragged lengths, GQA/MQA/MHA, packed segments, sliding windows and
// head dims 32, 64 and 128. Every output starts as NaN; relative L2 above 1e-2
// fails, as does a backward that differs bit for bit between two runs. The
// kernels' shared-memory sizes are their own attn_smem_bytes, allocated
// exactly, under AddressSanitizer. About four minutes on the 2-core CPU machine:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -ffp-contract=off -pthread \
//       scripts/emulate_attention.cpp -o /tmp/emulate_attention && /tmp/emulate_attention
#include "emulate_cuda.h"
#include <type_traits>

// The source as NVRTC sees it: common.cuh first.
#include "../kernels/cuda/common.cuh"
#include "../kernels/cuda/attention.cu"

struct Shape {
    int t, heads, kv_heads, d, window, segments;
};

// Values of bf16 or f32 arrays as doubles, and arrays of NaN or random
// values (rounded to the element type).
template <typename T>
static std::vector<double> wide(const std::vector<T>& x) {
    std::vector<double> r(x.size());
    for (size_t i = 0; i < x.size(); ++i) r[i] = ld(x.data(), i);
    return r;
}
template <typename T>
static std::vector<T> filled(size_t n, float lo, float hi) {
    std::vector<T> r(n);
    for (size_t i = 0; i < n; ++i) st(r.data(), i, std::isnan(lo) ? NAN : uni(lo, hi));
    return r;
}

// The entry point of head dim D.
#define BY_DIM(name, args)                 \
    if constexpr (D == 32) name##_32 args;  \
    else if constexpr (D == 64) name##_64 args; \
    else name##_128 args

// The launches of kernels/src/cuda/attention.rs.
template <int D>
struct Kernels {
    static void forward(const Shape& s, const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* rs_,
                        float scale, bf16_t* out, float* lse) {
        const Dim3 grid{(unsigned)((s.t + ATT_ROWS - 1) / ATT_ROWS), (unsigned)s.heads, 1};
        const int group = s.heads / s.kv_heads;
        launch(grid, ATT_THREADS, attn_smem_bytes(ATT_FWD, D), [&] {
            BY_DIM(attn_fwd, (q, k, v, out, lse, rs_, s.t, s.heads, group, s.window, scale));
        });
    }
    static void backward(const Shape& s, const bf16_t* q, const bf16_t* k, const bf16_t* v, const int* rs_,
                         float scale, const bf16_t* out, const float* lse, const bf16_t* dout, float* delta,
                         bf16_t* dq, bf16_t* dk, bf16_t* dv) {
        const int rows = s.t * s.heads, group = s.heads / s.kv_heads;
        launch(Dim3{(unsigned)std::clamp((rows * 32 + 255) / 256, 1, 5), 1, 1}, 256, 0,
               [&] { attn_delta(out, dout, delta, rows, D); });
        const unsigned tiles = (unsigned)((s.t + ATT_ROWS - 1) / ATT_ROWS);
        launch(Dim3{tiles, (unsigned)s.heads, 1}, ATT_THREADS, attn_smem_bytes(ATT_DQ, D), [&] {
            BY_DIM(attn_dq, (q, k, v, dout, lse, delta, dq, rs_, s.t, s.heads, group, s.window, scale));
        });
        launch(Dim3{tiles, (unsigned)s.kv_heads, 1}, ATT_THREADS, attn_smem_bytes(ATT_DKDV, D), [&] {
            BY_DIM(attn_dkdv, (q, k, v, dout, lse, delta, dk, dv, rs_, s.t, s.heads, group, s.window, scale));
        });
    }
    // f32: the CUDA-core kernels, a block per row and head.
    static void forward(const Shape& s, const float* q, const float* k, const float* v, const int* rs_,
                        float scale, float* out, float* lse) {
        const int group = s.heads / s.kv_heads;
        launch(Dim3{(unsigned)s.t, (unsigned)s.heads, 1}, ATT_THREADS, 0, [&] {
            BY_DIM(attn_f32_fwd, (q, k, v, out, lse, rs_, s.t, s.heads, group, s.window, scale));
        });
    }
    static void backward(const Shape& s, const float* q, const float* k, const float* v, const int* rs_,
                         float scale, const float* out, const float* lse, const float* dout, float* delta,
                         float* dq, float* dk, float* dv) {
        const int rows = s.t * s.heads, group = s.heads / s.kv_heads;
        launch(Dim3{(unsigned)std::clamp((rows * 32 + 255) / 256, 1, 5), 1, 1}, 256, 0,
               [&] { attn_delta_f32(out, dout, delta, rows, D); });
        launch(Dim3{(unsigned)s.t, (unsigned)s.heads, 1}, ATT_THREADS, 0, [&] {
            BY_DIM(attn_f32_dq, (q, k, v, dout, lse, delta, dq, rs_, s.t, s.heads, group, s.window, scale));
        });
        launch(Dim3{(unsigned)s.t, (unsigned)s.kv_heads, 1}, ATT_THREADS, 0, [&] {
            BY_DIM(attn_f32_dkdv, (q, k, v, dout, lse, delta, dk, dv, rs_, s.t, s.heads, group, s.window, scale));
        });
    }
};

// Generation's step (attn_cached_D, attn_f32_cached_D): n new queries
// after `start` cached positions, the cache `cap` rows with NaN past
// `start` (a read there poisons the result), against the double reference
// over the whole sequence.
template <int D, typename T = bf16_t>
static void test_cached(int start, int n, int H, int KH, int window, int cap) {
    constexpr bool F32 = std::is_same_v<T, float>;
    const int total = start + n, group = H / KH;
    const size_t qw = (size_t)H * D, kw = (size_t)KH * D;
    const float scale = 1.0f / std::sqrt((float)D);
    auto q = filled<T>(n * qw, -2, 2), k = filled<T>(total * kw, -2, 2), v = filled<T>(total * kw, -1, 1);
    T nan;
    st(&nan, 0, NAN);
    std::vector<T> kc(cap * kw, nan), vc(cap * kw, nan);
    std::copy(k.begin(), k.begin() + start * kw, kc.begin());
    std::copy(v.begin(), v.begin() + start * kw, vc.begin());
    std::vector<T> out(n * qw, nan);
    const T *kn = k.data() + start * kw, *vn = v.data() + start * kw;
    launch(Dim3{(unsigned)n, (unsigned)H, 1}, ATT_THREADS, 0, [&] {
        if constexpr (F32) {
            BY_DIM(attn_f32_cached, (q.data(), kn, vn, kc.data(), vc.data(), out.data(), start, H, group, window, scale));
        } else {
            BY_DIM(attn_cached, (q.data(), kn, vn, kc.data(), vc.data(), out.data(), start, H, group, window, scale));
        }
    });
    const auto Q = wide(q), K = wide(k), V = wide(v);
    std::vector<double> O(n * qw, 0), p(total);
    for (int h = 0; h < H; ++h)
        for (int i = 0; i < n; ++i) {
            const int pos = start + i, lo = window > 0 ? std::max(0, pos + 1 - window) : 0;
            double m = -INFINITY, sum = 0;
            for (int j = lo; j <= pos; ++j) {
                double dot = 0;
                for (int c = 0; c < D; ++c) dot += Q[i * qw + h * D + c] * K[j * kw + h / group * D + c];
                m = std::max(m, p[j] = dot * scale);
            }
            for (int j = lo; j <= pos; ++j) sum += (p[j] = std::exp(p[j] - m));
            for (int j = lo; j <= pos; ++j)
                for (int c = 0; c < D; ++c) O[i * qw + h * D + c] += p[j] / sum * V[j * kw + h / group * D + c];
        }
    char what[200];
    snprintf(what, sizeof what, "attention_cached %s start=%d n=%d heads=%d/%d d=%d window=%d out rel L2",
             F32 ? "f32" : "bf16", start, n, H, KH, D, window);
    const double e = rel_l2(wide(out), O);
    expect(e < (F32 ? 1e-5 : 5e-3), what, e);
}

// The tiled tensor-core kernels on bf16 (T = bf16_t), or the CUDA-core
// kernels on f32 (T = float: bound 1e-5, as the f32 bound).
template <int D, typename T = bf16_t>
static void test(const Shape& s, float range) {
    const int t = s.t, H = s.heads, KH = s.kv_heads, group = H / KH;
    const size_t qw = (size_t)H * D, kw = (size_t)KH * D;
    const float scale = 1.0f / std::sqrt((float)D);
    // Segments: `segments` contiguous runs cut at random points; the run
    // starts as the launcher computes them.
    std::vector<int> seg(t, 0), run_start(t);
    for (int c = 1; c < s.segments; ++c) {
        const int cut = 1 + (int)below(std::max(t - 1, 1));
        for (int i = cut; i < t; ++i) seg[i]++;
    }
    for (int i = 0; i < t; ++i) run_start[i] = i > 0 && seg[i] == seg[i - 1] ? run_start[i - 1] : i;
    auto q = filled<T>(t * qw, -range, range), k = filled<T>(t * kw, -range, range),
         v = filled<T>(t * kw, -1, 1), dout = filled<T>(t * qw, -1, 1);
    auto nans = [](size_t n) { return filled<T>(n, NAN, NAN); };

    auto out = nans(t * qw), dq = nans(t * qw), dk = nans(t * kw), dv = nans(t * kw);
    std::vector<float> lse((size_t)t * H, NAN), delta((size_t)t * H, NAN);
    Kernels<D>::forward(s, q.data(), k.data(), v.data(), run_start.data(), scale, out.data(), lse.data());
    Kernels<D>::backward(s, q.data(), k.data(), v.data(), run_start.data(), scale, out.data(), lse.data(),
                         dout.data(), delta.data(), dq.data(), dk.data(), dv.data());
    // A second backward from NaN again: bit-identical.
    auto dq2 = nans(t * qw), dk2 = nans(t * kw), dv2 = nans(t * kw);
    std::vector<float> delta2((size_t)t * H, NAN);
    Kernels<D>::backward(s, q.data(), k.data(), v.data(), run_start.data(), scale, out.data(), lse.data(),
                         dout.data(), delta2.data(), dq2.data(), dk2.data(), dv2.data());
    auto bits = [](const std::vector<T>& x) {
        return std::vector<unsigned char>((const unsigned char*)x.data(), (const unsigned char*)(x.data() + x.size()));
    };
    const bool same = bits(dq) == bits(dq2) && bits(dk) == bits(dk2) && bits(dv) == bits(dv2);

    // The reference, in double from the same inputs.
    const auto Q = wide(q), K = wide(k), V = wide(v), DO = wide(dout);
    std::vector<double> O(t * qw, 0), L((size_t)t * H), DQ(t * qw, 0), DK(t * kw, 0), DV(t * kw, 0);
    auto visible = [&](int i, int j) { return j <= i && seg[j] == seg[i] && (s.window == 0 || i - j < s.window); };
    std::vector<double> p(t), dp(t);
    for (int h = 0; h < H; ++h) {
        const int kh = h / group;
        for (int i = 0; i < t; ++i) {
            const double* qi = &Q[i * qw + h * D];
            double m = -INFINITY;
            for (int j = 0; j < t; ++j) {
                if (!visible(i, j)) continue;
                double dot = 0;
                for (int c = 0; c < D; ++c) dot += qi[c] * K[j * kw + kh * D + c];
                p[j] = dot * scale;
                m = std::max(m, p[j]);
            }
            double sum = 0;
            for (int j = 0; j < t; ++j)
                if (visible(i, j)) sum += (p[j] = std::exp(p[j] - m));
            L[i * H + h] = m + std::log(sum);
            double* oi = &O[i * qw + h * D];
            for (int j = 0; j < t; ++j) {
                if (!visible(i, j)) continue;
                p[j] /= sum;
                for (int c = 0; c < D; ++c) oi[c] += p[j] * V[j * kw + kh * D + c];
            }
            const double* doi = &DO[i * qw + h * D];
            double dlt = 0;
            for (int c = 0; c < D; ++c) dlt += doi[c] * oi[c];
            for (int j = 0; j < t; ++j) {
                if (!visible(i, j)) continue;
                double d = 0;
                for (int c = 0; c < D; ++c) d += doi[c] * V[j * kw + kh * D + c];
                const double ds = p[j] * (d - dlt) * scale;
                for (int c = 0; c < D; ++c) {
                    DQ[i * qw + h * D + c] += ds * K[j * kw + kh * D + c];
                    DK[j * kw + kh * D + c] += ds * qi[c];
                    DV[j * kw + kh * D + c] += p[j] * doi[c];
                }
            }
        }
    }
    char what[200];
    const char* name[5] = {"out", "lse", "dq", "dk", "dv"};
    // dq and dk vanish where a query sees one key (softmax's gradient is zero
    // there): measured against the incoming gradient's size then.
    double dout_norm = 0;
    for (double x : DO) dout_norm += x * x;
    const double floor = 1e-2 * std::sqrt(dout_norm);
    const double e[5] = {rel_l2(wide(out), O), rel_l2(std::vector<double>(lse.begin(), lse.end()), L),
                         rel_l2(wide(dq), DQ, floor), rel_l2(wide(dk), DK, floor), rel_l2(wide(dv), DV)};
    const bool f32 = sizeof(T) == 4;
    for (int o = 0; o < 5; ++o) {
        snprintf(what, sizeof what, "attention%s t=%d heads=%d/%d d=%d window=%d segments=%d %s rel L2",
                 f32 ? " f32" : "", t, H, KH, D, s.window, s.segments, name[o]);
        expect(e[o] < (f32 ? 1e-5 : 1e-2), what, e[o]);
    }
    snprintf(what, sizeof what, "attention%s t=%d heads=%d/%d d=%d backward deterministic", f32 ? " f32" : "", t, H,
             KH, D);
    expect(same, what, 0);
}

int main() {
    // (t, heads, kv heads, d, window (0: none), segments), q and k range; t
    // ragged against the 64-row tiles and the dkdv kernel's 32-query steps.
    // One long segment (or a window longer than a tile) gives tiles every
    // row of a block sees whole, which the kernels take unmasked.
    // (A window of 1 is left out: each query sees only itself, so dq and dk
    // are exactly 0 and only rounding noise remains to compare.)
    test<32>({1, 4, 2, 32, 0, 1}, 1.0f);
    test<32>({160, 4, 2, 32, 0, 2}, 2.0f);
    test<32>({77, 4, 1, 32, 30, 3}, 3.0f);
    test<32>({200, 4, 2, 32, 0, 1}, 2.0f);
    test<64>({1, 4, 1, 64, 0, 1}, 1.0f);
    test<64>({37, 4, 2, 64, 0, 3}, 2.0f);
    test<64>({64, 4, 2, 64, 0, 1}, 4.0f);
    test<64>({150, 4, 4, 64, 20, 2}, 2.0f);
    test<64>({100, 4, 1, 64, 2, 5}, 1.0f);
    test<64>({300, 4, 2, 64, 0, 6}, 2.0f);
    test<64>({256, 4, 4, 64, 150, 1}, 2.0f);
    test<128>({65, 4, 4, 128, 33, 4}, 2.0f);
    test<128>({130, 4, 2, 128, 0, 3}, 2.0f);
    test<128>({97, 4, 1, 128, 70, 2}, 3.0f);
    test<128>({257, 4, 1, 128, 64, 3}, 1.0f);
    test<128>({195, 4, 2, 128, 0, 1}, 2.0f);
    // f32 on the CUDA-core kernels: ragged lengths, segments, windows, GQA.
    // (Short: the emulator starts 128 threads for each row's block.)
    test<32, float>({29, 4, 1, 32, 9, 3}, 3.0f);
    test<64, float>({24, 4, 4, 64, 0, 2}, 2.0f);
    test<128, float>({21, 4, 2, 128, 7, 1}, 3.0f);
    // Generation: a prompt (start 0), single tokens after it, a window, MQA.
    test_cached<32>(0, 7, 4, 2, 0, 16);
    test_cached<64>(37, 1, 4, 1, 0, 64);
    test_cached<64>(100, 3, 4, 4, 20, 128);
    test_cached<128>(130, 1, 4, 2, 0, 200);
    test_cached<128>(0, 70, 8, 2, 33, 80);
    test_cached<32, float>(0, 7, 4, 2, 0, 16);
    test_cached<64, float>(37, 1, 4, 1, 0, 64);
    test_cached<128, float>(100, 3, 8, 2, 20, 128);
    printf("ldmatrix: %ld of %ld 8-row phases with bank conflicts\n", g_ldsm_conflicts.load(),
           g_ldsm_phases.load());
    printf("%d failures\n", fails);
    return fails != 0;
}
