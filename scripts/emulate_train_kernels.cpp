// The training-step kernels (kernels/cuda/{loss,embedding,update,
// elementwise,dora,rows}.cu) run on the CPU by emulation, checked against
// f64 / operation-by-operation references: a check of their index math, barriers and reductions that
// needs no GPU (the GPU tests in kernels/tests/cuda.rs are the real check).
// The emulation (scripts/emulate_cuda.h) runs under AddressSanitizer so any
// out-of-bounds access fails. About 100 s on the 2-core CPU machine:
//
//   g++ -std=c++20 -O1 -g -fsanitize=address,undefined -ffp-contract=off -pthread \
//       scripts/emulate_train_kernels.cpp -o /tmp/emulate && /tmp/emulate
#include "emulate_cuda.h"

// The sources as NVRTC sees them: common.cuh first.
#include "../kernels/cuda/common.cuh"
#include "../kernels/cuda/loss.cu"
#include "../kernels/cuda/embedding.cu"
#include "../kernels/cuda/update.cu"
#include "../kernels/cuda/elementwise.cu"
#include "../kernels/cuda/dora.cu"
#include "../kernels/cuda/rows.cu"

static bf16_t to_bf16(float f) { return f32_to_bf16(f); }
static float from_bf16(bf16_t h) { return bf16_to_f32(h); }

static void test_ce(int rows, int vocab, int skip, int ignore, float dloss, float range, unsigned threads) {
    std::vector<bf16_t> x(rows * (size_t)vocab);
    for (auto& v : x) v = to_bf16(uni(-range, range));
    std::vector<int> labels(rows);
    int counted = 0;
    for (auto& l : labels) { l = (skip > 0 && below(skip) == 0) ? ignore : (int)below(vocab); counted += l != ignore; }
    float c = dloss / (float)counted;
    std::vector<bf16_t> d(x.size(), 0x7fc0);
    std::vector<float> rl(rows, NAN);
    std::vector<float> loss(1, NAN);
    launch(rows, threads, [&] { cross_entropy_fwd_bwd(x.data(), labels.data(), d.data(), rl.data(), vocab, ignore, c); });
    // The gradient alone on f32 logits (the unfused backward of f32 steps),
    // dloss read on the device.
    std::vector<float> x32(x.size()), d32(x.size(), NAN);
    for (size_t i = 0; i < x.size(); ++i) x32[i] = from_bf16(x[i]);
    const float dl[1] = {dloss};
    launch(rows, threads, [&] {
        cross_entropy_grad_f32(x32.data(), labels.data(), d32.data(), vocab, ignore, dl, (float)counted);
    });
    launch(1, threads, [&] { mean_loss(rl.data(), rows, (double)counted, loss.data()); });
    std::vector<double> wg(x.size()), gg(x.size()), wl(rows), gl(rows);
    double sum = 0;
    for (int r = 0; r < rows; ++r) {
        const bf16_t* xr = &x[(size_t)r * vocab];
        gl[r] = rl[r];
        for (int j = 0; j < vocab; ++j) gg[(size_t)r * vocab + j] = from_bf16(d[(size_t)r * vocab + j]);
        if (labels[r] == ignore) { wl[r] = 0; for (int j = 0; j < vocab; ++j) wg[(size_t)r * vocab + j] = 0; continue; }
        double m = -INFINITY;
        for (int j = 0; j < vocab; ++j) m = std::max(m, (double)from_bf16(xr[j]));
        double s = 0;
        for (int j = 0; j < vocab; ++j) s += std::exp(from_bf16(xr[j]) - m);
        double lse = m + std::log(s);
        wl[r] = lse - from_bf16(xr[labels[r]]);
        sum += wl[r];
        for (int j = 0; j < vocab; ++j)
            wg[(size_t)r * vocab + j] = c * (std::exp(from_bf16(xr[j]) - lse) - (j == labels[r]));
    }
    char what[200];
    snprintf(what, sizeof what, "ce %dx%d threads=%u grad", rows, vocab, threads);
    double e = rel_l2(gg, wg); expect(e < 1e-2, what, e);
    if (counted > 0) {
        std::vector<double> g32(d32.begin(), d32.end());
        snprintf(what, sizeof what, "ce %dx%d threads=%u f32 grad alone", rows, vocab, threads);
        e = rel_l2(g32, wg);
        expect(e < 1e-5, what, e);
    }
    snprintf(what, sizeof what, "ce %dx%d threads=%u row loss", rows, vocab, threads);
    e = rel_l2(gl, wl); expect(e < 1e-5, what, e);
    snprintf(what, sizeof what, "ce %dx%d threads=%u mean loss", rows, vocab, threads);
    if (counted == 0) expect(std::isnan(loss[0]), what, loss[0]);
    else { e = std::fabs(loss[0] - sum / counted) / std::max(1.0, std::fabs(sum / counted)); expect(e < 1e-5, what, e); }
}

static void test_emb(int vocab, int h, int tokens, int distinct, unsigned threads) {
    std::vector<int> pool(distinct), ids(tokens);
    for (auto& p : pool) p = (int)below(vocab);
    for (auto& t : ids) t = pool[below(distinct)];
    std::vector<bf16_t> table(vocab * (size_t)h), dy(tokens * (size_t)h), y(tokens * (size_t)h, 0x7fc0);
    for (auto& v : table) v = to_bf16(uni(-1, 1));
    for (auto& v : dy) v = to_bf16(uni(-1, 1));
    size_t n = y.size();
    unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, 7);  // few blocks: the stride loop runs
    launch(grid, threads, [&] { embedding_fwd(table.data(), ids.data(), y.data(), n, h, vocab); });
    bool same = true;
    for (int t = 0; t < tokens; ++t) for (int j = 0; j < h; ++j) same &= y[(size_t)t * h + j] == table[(size_t)ids[t] * h + j];
    char what[200];
    snprintf(what, sizeof what, "embedding fwd vocab=%d h=%d tokens=%d", vocab, h, tokens);
    expect(same, what, 0);
    // DeviceIds' grouping, as kernels/src/cuda/ids.rs builds it.
    std::vector<int> order(tokens);
    for (int i = 0; i < tokens; ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ids[a] < ids[b]; });
    std::vector<int> starts;
    for (int k = 0; k < tokens; ++k) if (k == 0 || ids[order[k]] != ids[order[k - 1]]) starts.push_back(k);
    int groups = starts.size();
    starts.push_back(tokens);
    std::vector<float> dt(vocab * (size_t)h, 0.0f);  // the memset
    launch(groups, threads, [&] { embedding_bwd(dy.data(), ids.data(), order.data(), starts.data(), dt.data(), h); });
    std::vector<float> want(dt.size(), 0.0f);
    for (int t = 0; t < tokens; ++t) for (int j = 0; j < h; ++j) want[(size_t)ids[t] * h + j] += from_bf16(dy[(size_t)t * h + j]);
    bool exact = std::memcmp(want.data(), dt.data(), 4 * want.size()) == 0;
    snprintf(what, sizeof what, "embedding bwd vocab=%d h=%d tokens=%d groups=%d (bit-identical)", vocab, h, tokens, groups);
    expect(exact, what, 0);
}

static float lerp_ref(float a, float b, float w) { return std::fabs(w) < 0.5f ? std::fma(b - a, w, a) : std::fma(b - a, w - 1.0f, b); }

static void test_opt(size_t n, unsigned threads, unsigned max_blocks) {
    std::vector<float> p(n), g(n), m(n, 0), v(n, 0);
    for (auto& x : p) x = uni(-1, 1);
    std::vector<float> P = p, M = m, V = v;
    for (int t = 1; t <= 3; ++t) {
        for (auto& x : g) x = uni(-0.5, 0.5);
        double lr = 1e-2 * t, b1 = t == 2 ? 0.3 : 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01;
        float decay = (float)(1 - lr * wd), w1 = (float)(1 - b1), fb2 = (float)b2, w2 = (float)(1 - b2);
        float bc2 = (float)std::sqrt(1 - std::pow(b2, t)), feps = (float)eps, ns = (float)(-(lr / (1 - std::pow(b1, t))));
        unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
        launch(grid, threads, [&] { adamw_update(p.data(), g.data(), m.data(), v.data(), n, decay, w1, fb2, w2, bc2, feps, ns); });
        for (size_t i = 0; i < n; ++i) {
            P[i] *= decay; M[i] = lerp_ref(M[i], g[i], w1);
            V[i] = std::fma(w2 * g[i], g[i], V[i] * fb2);
            float den = std::sqrt(V[i]) / bc2 + feps;
            P[i] += (ns * M[i]) / den;
        }
    }
    char what[200];
    snprintf(what, sizeof what, "adamw n=%zu (bit-identical p, m, v)", n);
    expect(!std::memcmp(p.data(), P.data(), 4 * n) && !std::memcmp(m.data(), M.data(), 4 * n) && !std::memcmp(v.data(), V.data(), 4 * n), what, 0);
    for (float clip : {0.0f, 0.5f, -1.0f}) {
        for (auto& x : g) x = uni(-2, 2);
        // clip -1: the measuring pass (lr 0), which writes nothing.
        float lr = clip < 0 ? 0.0f : 0.02f, coef = 0.7f, wd = clip != 0 ? 0.1f : 0.0f;
        std::vector<float> q = p;
        unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
        std::vector<double> partials(max_blocks, NAN);
        std::vector<float> sq(1, NAN);
        launch(grid, threads, [&] { sgd_update(p.data(), g.data(), &lr, &coef, n, wd, clip, partials.data()); });
        launch(1, threads, [&] { sum_partials(partials.data(), (int)grid, sq.data()); });
        double want = 0;
        for (size_t i = 0; i < n; ++i) {
            want += (double)g[i] * g[i];
            if (lr == 0) continue;
            float gi = clip > 0 ? std::clamp(g[i], -clip, clip) : g[i];
            float d = gi * coef;
            if (wd != 0) d = std::fma(q[i], wd, d);
            q[i] = std::fma(d, -lr, q[i]);
        }
        snprintf(what, sizeof what, "sgd n=%zu clip=%g grid=%u (bit-identical p)", n, clip, grid);
        expect(!std::memcmp(p.data(), q.data(), 4 * n), what, 0);
        snprintf(what, sizeof what, "sgd n=%zu clip=%g squared norm rel err", n, clip);
        double e = std::fabs(sq[0] - want) / want;
        expect(e < 1e-6, what, e);
    }
}

// AdaLomo's launches in order against a port of kernels/src/update.rs's
// adalomo_update (means summed in f64 in element order, the kernels' in f64
// in their own order, so the two agree to rounding): three steps of a matrix
// (factored second moment) or a vector, then a measuring step (lr 0) that
// must write nothing.
static void test_adalomo(size_t rows, size_t cols, bool factored, unsigned threads, unsigned max_blocks) {
    size_t n = rows * cols;
    const float eps1 = 1e-30f, eps2 = 1e-3f, thr = 1.0f, decay = -0.8f, wd = factored ? 0.01f : 0.0f;
    const float clip = factored ? 0.3f : 0.0f;
    std::vector<float> p(n), g(n), row(factored ? rows : n, 0), col(factored ? cols : 1, 0);
    for (auto& x : p) x = uni(-1, 1);
    std::vector<float> P = p, R = row, C = col;
    unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
    std::vector<double> partials(2 * max_blocks, NAN);
    std::vector<float> scal(3, NAN), sq(1, NAN);
    char what[200];
    for (int t = 1; t <= 4; ++t) {
        for (auto& x : g) x = uni(-0.5, 0.5);
        const float lr = t == 4 ? 0.0f : 0.05f, coef = t == 2 ? 0.6f : 1.0f, step = (float)t;
        std::vector<float> before = p;
        launch(grid, threads, [&] { sum_squares(g.data(), n, partials.data()); });
        launch(1, threads, [&] { sum_partials(partials.data(), (int)grid, sq.data()); });
        if (factored) {
            launch((unsigned)std::min<size_t>(rows, 7), threads, [&] {
                adalomo_rows(g.data(), row.data(), (int)rows, (int)cols, &lr, &coef, &step, clip, eps1, decay);
            });
            launch((unsigned)std::min<size_t>((cols + 31) / 32, 3), threads, [&] {
                adalomo_cols(g.data(), col.data(), (int)rows, (int)cols, &lr, &coef, &step, clip, eps1, decay);
            });
            launch(1, threads, [&] { adalomo_row_mean(row.data(), (int)rows, &lr, scal.data()); });
        } else {
            launch(grid, threads, [&] { adalomo_vector(g.data(), row.data(), n, &lr, &coef, &step, clip, eps1, decay); });
        }
        size_t kc = factored ? cols : 0;
        launch(grid, threads, [&] {
            adalomo_norms(p.data(), g.data(), row.data(), col.data(), n, kc, &lr, &coef, clip, scal.data(), partials.data());
        });
        launch(1, threads, [&] { adalomo_finish(partials.data(), (int)grid, n, &lr, eps2, thr, scal.data()); });
        launch(grid, threads, [&] {
            adalomo_apply(p.data(), g.data(), row.data(), col.data(), n, kc, &lr, &coef, clip, wd, scal.data());
        });
        // The reference step.
        double want_sq = 0;
        for (float x : g) want_sq += (double)x * x;
        snprintf(what, sizeof what, "adalomo %zux%zu%s t=%d squared norm", rows, cols, factored ? "" : " (full)", t);
        expect(std::fabs(sq[0] - want_sq) / want_sq < 1e-6, what, std::fabs(sq[0] - want_sq) / want_sq);
        if (lr == 0.0f) {
            snprintf(what, sizeof what, "adalomo %zux%zu lr=0 writes nothing", rows, cols);
            expect(!std::memcmp(p.data(), before.data(), 4 * n), what, 0);
            continue;
        }
        std::vector<float> gc(n), u(n);
        for (size_t i = 0; i < n; ++i) gc[i] = (clip > 0 ? std::clamp(g[i], -clip, clip) : g[i]) * coef;
        float beta = 1.0f - std::pow((float)t, decay);
        if (factored) {
            std::vector<double> cm(cols, 0);
            for (size_t r = 0; r < rows; ++r) {
                double s = 0;
                for (size_t c = 0; c < cols; ++c) { double v = gc[r * cols + c] * gc[r * cols + c] + eps1; s += v; cm[c] += v; }
                R[r] = R[r] * beta + (float)(s / cols) * (1 - beta);
            }
            for (size_t c = 0; c < cols; ++c) C[c] = C[c] * beta + (float)(cm[c] / rows) * (1 - beta);
            double rsum = 0;
            for (float x : R) rsum += x;
            float rm = (float)(rsum / rows);
            for (size_t i = 0; i < n; ++i) u[i] = (1.0f / std::sqrt(R[i / cols] / rm)) * (1.0f / std::sqrt(C[i % cols])) * gc[i];
        } else {
            for (size_t i = 0; i < n; ++i) { R[i] = R[i] * beta + (gc[i] * gc[i] + eps1) * (1 - beta); u[i] = gc[i] / std::sqrt(R[i]); }
        }
        double su = 0, sp = 0;
        for (size_t i = 0; i < n; ++i) { su += (double)u[i] * u[i]; sp += (double)P[i] * P[i]; }
        float scale = std::max((float)std::sqrt(su / n) / thr, 1.0f);
        float lr_eff = lr * std::max(eps2, (float)std::sqrt(sp / n)), dec = 1 - lr_eff * wd;
        for (size_t i = 0; i < n; ++i) { if (wd != 0) P[i] *= dec; P[i] -= lr_eff * (u[i] / scale); }
        auto cmp = [&](const std::vector<float>& got, const std::vector<float>& want, const char* name) {
            std::vector<double> a(got.begin(), got.end()), b(want.begin(), want.end());
            double e = rel_l2(a, b);
            snprintf(what, sizeof what, "adalomo %zux%zu%s t=%d %s", rows, cols, factored ? "" : " (full)", t, name);
            expect(e < 1e-5, what, e);
        };
        cmp(p, P, "p");
        cmp(row, R, "row");
        if (factored) cmp(col, C, "col");
    }
}

// The elementwise glue, bit for bit against kernels/src/elementwise.rs's
// arithmetic (f32 math, one rounding to the output type): mul, scale,
// mul_cols of every type pair, DoRA's combine; sum_rows against f64.
template <typename T> static float ldv(const std::vector<T>& v, size_t k) { return ld(v.data(), k); }
template <typename T> static std::vector<T> rand_vec(size_t n, float lo, float hi) {
    std::vector<T> v(n);
    for (size_t k = 0; k < n; ++k) st(v.data(), k, uni(lo, hi));
    return v;
}
template <typename T> static bool same(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && !std::memcmp(a.data(), b.data(), sizeof(T) * a.size());
}

template <typename T, typename V>
static void test_elementwise(int rows, int cols, unsigned threads, unsigned max_blocks, const char* types) {
    size_t n = (size_t)rows * cols;
    unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
    auto a = rand_vec<T>(n, -3, 3), b = rand_vec<T>(n, -3, 3);
    auto v = rand_vec<V>(cols, -2, 2);
    std::vector<T> y(n), want(n);
    char what[200];
    launch(grid, threads, [&] { mul_impl(a.data(), b.data(), y.data(), n); });
    for (size_t k = 0; k < n; ++k) st(want.data(), k, ldv(a, k) * ldv(b, k));
    snprintf(what, sizeof what, "mul %s %dx%d grid=%u (bit-identical)", types, rows, cols, grid);
    expect(same(y, want), what, 0);
    launch(grid, threads, [&] { scale_impl(a.data(), 0.37f, y.data(), n); });
    for (size_t k = 0; k < n; ++k) st(want.data(), k, ldv(a, k) * 0.37f);
    snprintf(what, sizeof what, "scale %s %dx%d (bit-identical)", types, rows, cols);
    expect(same(y, want), what, 0);
    launch(grid, threads, [&] { mul_cols_impl(a.data(), v.data(), y.data(), n, (size_t)cols); });
    for (size_t k = 0; k < n; ++k) st(want.data(), k, ldv(a, k) * ldv(v, k % cols));
    snprintf(what, sizeof what, "mul_cols %s %dx%d (bit-identical)", types, rows, cols);
    expect(same(y, want), what, 0);
    // In place, as the GPU's column-scale epilogue runs it.
    std::vector<T> x = a;
    launch(grid, threads, [&] { mul_cols_impl(x.data(), v.data(), x.data(), n, (size_t)cols); });
    snprintf(what, sizeof what, "mul_cols in place %s %dx%d (bit-identical)", types, rows, cols);
    expect(same(x, want), what, 0);
    auto lora = rand_vec<float>(n, -1, 1), sc = rand_vec<float>(cols, 0.5, 2);
    launch(grid, threads, [&] { dora_combine_impl(a.data(), lora.data(), sc.data(), y.data(), n, (size_t)cols); });
    for (size_t k = 0; k < n; ++k) st(want.data(), k, (ldv(a, k) + lora[k]) * sc[k % cols]);
    snprintf(what, sizeof what, "dora_combine %s %dx%d (bit-identical)", types, rows, cols);
    expect(same(y, want), what, 0);
    std::vector<T> sums(cols);
    launch((unsigned)((cols + 31) / 32), threads, [&] { sum_rows_impl(a.data(), sums.data(), rows, cols); });
    std::vector<double> got(cols), ref(cols, 0.0);
    for (int c = 0; c < cols; ++c) {
        got[c] = ldv(sums, c);
        for (int r = 0; r < rows; ++r) ref[c] += ldv(a, (size_t)r * cols + c);
    }
    double e = rel_l2(got, ref, std::sqrt((double)rows * cols) * 1e-3);
    snprintf(what, sizeof what, "sum_rows %s %dx%d threads=%u rel err", types, rows, cols, threads);
    expect(e < (sizeof(T) == 2 ? 8e-3 : 1e-5), what, e);
}

// DoRA's weight norm against f64: y[o] = 1/‖w_o + s·(b·a)_o‖.
template <typename W>
static void test_dora_norm(int out, int in, int r, float s, unsigned threads, const char* types) {
    auto a = rand_vec<float>((size_t)r * in, -0.5, 0.5), b = rand_vec<float>((size_t)out * r, -0.5, 0.5);
    auto w = rand_vec<W>((size_t)out * in, -1, 1);
    std::vector<float> y(out, NAN);
    launch((unsigned)((out + DORA_ROWS - 1) / DORA_ROWS), threads,
           [&] { dora_inv_norm_impl(a.data(), b.data(), w.data(), s, out, in, r, y.data()); });
    std::vector<double> got(y.begin(), y.end()), ref(out);
    for (int o = 0; o < out; ++o) {
        double sq = 0;
        for (int i = 0; i < in; ++i) {
            double ba = 0;
            for (int k = 0; k < r; ++k) ba += (double)b[(size_t)o * r + k] * a[(size_t)k * in + i];
            double v = ldv(w, (size_t)o * in + i) + s * ba;
            sq += v * v;
        }
        ref[o] = 1.0 / std::sqrt(sq);
    }
    char what[200];
    snprintf(what, sizeof what, "dora_inv_norm %s out=%d in=%d r=%d threads=%u rel err", types, out, in, r, threads);
    double e = rel_l2(got, ref);
    expect(e < 1e-5, what, e);
}

// A training step's gradient handling on the device, against the trainer's
// host loop: accumulation over micro-batches and the clip bit for bit, the
// global norm (f64 partials per block of every tensor) to 1e-12.
static void test_grads(std::vector<size_t> sizes, unsigned threads, unsigned max_blocks) {
    std::vector<std::vector<float>> acc, ref;
    for (size_t n : sizes) { acc.emplace_back(n, NAN); ref.emplace_back(n, NAN); }
    for (int micro = 0; micro < 3; ++micro) {
        float w = micro == 2 ? 0.25f : 0.375f;
        for (size_t t = 0; t < sizes.size(); ++t) {
            size_t n = sizes[t];
            std::vector<float> g(n);
            for (auto& x : g) x = uni(-2, 2);
            unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
            int first = micro == 0;
            launch(grid, threads, [&] { grad_accumulate(acc[t].data(), g.data(), w, n, first); });
            for (size_t i = 0; i < n; ++i) ref[t][i] = first ? w * g[i] : ref[t][i] + w * g[i];
        }
    }
    char what[200];
    bool same = true;
    for (size_t t = 0; t < sizes.size(); ++t) same &= !std::memcmp(acc[t].data(), ref[t].data(), 4 * sizes[t]);
    snprintf(what, sizeof what, "grad_accumulate %zu tensors threads=%u (bit-identical)", sizes.size(), threads);
    expect(same, what, 0);
    std::vector<double> partials;
    double want = 0;
    for (size_t t = 0; t < sizes.size(); ++t) {
        size_t n = sizes[t];
        unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
        std::vector<double> part(grid, NAN);
        launch(grid, threads, [&] { sum_squares(acc[t].data(), n, part.data()); });
        partials.insert(partials.end(), part.begin(), part.end());
        for (float x : ref[t]) want += (double)x * x;
    }
    std::vector<double> out(1, NAN);
    launch(1, threads, [&] { sum_partials_f64(partials.data(), (int)partials.size(), out.data()); });
    double e = std::fabs(out[0] - want) / want;
    snprintf(what, sizeof what, "global squared norm %zu tensors threads=%u rel err", sizes.size(), threads);
    expect(e < 1e-12, what, e);
    for (auto [coef, maxv] : {std::pair{0.5f, 0.0f}, std::pair{1.0f, 0.3f}, std::pair{0.7f, 0.2f}}) {
        for (size_t t = 0; t < sizes.size(); ++t) {
            size_t n = sizes[t];
            std::vector<float> g = acc[t], r = acc[t];
            unsigned grid = (unsigned)std::clamp<size_t>((n + threads - 1) / threads, 1, max_blocks);
            launch(grid, threads, [&] { grad_clip(g.data(), n, coef, maxv); });
            for (auto& x : r) { if (coef < 1) x *= coef; if (maxv > 0) x = std::clamp(x, -maxv, maxv); }
            snprintf(what, sizeof what, "grad_clip n=%zu coef=%g max=%g (bit-identical)", n, coef, maxv);
            expect(!std::memcmp(g.data(), r.data(), 4 * n), what, 0);
        }
    }
}

// rows.cu on T = f32 (bound 1e-5) or bf16 (1e-2) against f64 formulas:
// RMSNorm forward (both gain forms), input and weight gradients; RoPE and
// its inverse; SwiGLU / GeGLU forward and backward.
template <typename T>
static void test_rows(int rows, int h, unsigned threads, const char* ty) {
    const double bound = sizeof(T) == 4 ? 1e-5 : 1e-2;
    auto rnd = [](size_t n, float lo, float hi) {
        std::vector<T> v(n);
        for (size_t i = 0; i < n; ++i) st(v.data(), i, uni(lo, hi));
        return v;
    };
    auto wide = [](const std::vector<T>& v) {
        std::vector<double> r(v.size());
        for (size_t i = 0; i < v.size(); ++i) r[i] = ld(v.data(), i);
        return r;
    };
    auto nans = [](size_t n) {
        std::vector<T> v(n);
        for (size_t i = 0; i < n; ++i) st(v.data(), i, NAN);
        return v;
    };
    char what[200];
    auto expect_close = [&](const char* name, const std::vector<double>& got, const std::vector<double>& want) {
        snprintf(what, sizeof what, "rows %s %s %dx%d threads=%u", ty, name, rows, h, threads);
        const double e = rel_l2(got, want);
        expect(e < bound, what, e);
    };
    const float eps = 1e-6f;
    auto x = rnd((size_t)rows * h, -2, 2), w = rnd(h, -1, 1), dy = rnd((size_t)rows * h, -1, 1);
    const auto X = wide(x), W = wide(w), DY = wide(dy);
    std::vector<double> r(rows);
    for (int i = 0; i < rows; ++i) {
        double ss = 0;
        for (int c = 0; c < h; ++c) ss += X[(size_t)i * h + c] * X[(size_t)i * h + c];
        r[i] = 1.0 / std::sqrt(ss / h + eps);
    }
    for (int unit : {0, 1}) {
        auto y = nans((size_t)rows * h), dx = nans((size_t)rows * h);
        launch(rows, threads, [&] { rms_norm_fwd_impl(x.data(), w.data(), y.data(), h, eps, unit); });
        launch(rows, threads, [&] { rms_norm_bwd_input_impl(x.data(), w.data(), dy.data(), dx.data(), h, eps, unit); });
        std::vector<double> wy(y.size()), wdx(y.size());
        for (int i = 0; i < rows; ++i) {
            double dot = 0;
            for (int c = 0; c < h; ++c) dot += X[(size_t)i * h + c] * DY[(size_t)i * h + c] * (W[c] + unit);
            for (int c = 0; c < h; ++c) {
                const size_t k = (size_t)i * h + c;
                wy[k] = X[k] * r[i] * (W[c] + unit);
                wdx[k] = r[i] * DY[k] * (W[c] + unit) - X[k] * r[i] * r[i] * r[i] * dot / h;
            }
        }
        expect_close(unit ? "rms_norm unit" : "rms_norm", wide(y), wy);
        expect_close(unit ? "rms_norm_grad_input unit" : "rms_norm_grad_input", wide(dx), wdx);
    }
    std::vector<float> rr(rows, NAN);
    auto dw = nans(h);
    launch(rows, threads, [&] { rms_norm_inv_rows_impl(x.data(), rr.data(), h, eps); });
    launch((h + 31) / 32, threads, [&] { rms_norm_grad_weight_impl(x.data(), dy.data(), rr.data(), dw.data(), rows, h); });
    std::vector<double> wdw(h, 0);
    for (int i = 0; i < rows; ++i)
        for (int c = 0; c < h; ++c) wdw[c] += DY[(size_t)i * h + c] * X[(size_t)i * h + c] * r[i];
    expect_close("rms_norm_grad_weight", wide(dw), wdw);

    // RoPE: rows tokens of 2 heads of h/2 (h even here, halves of h/4).
    const int heads = 2, half = h / 4;
    if (half > 0) {
        std::vector<int> pos(rows);
        for (int t = 0; t < rows; ++t) pos[t] = (t * 37) % 5000;
        std::vector<float> inv(half);
        for (int i = 0; i < half; ++i) inv[i] = std::pow(10000.f, -(float)i / half);
        const size_t n = (size_t)rows * heads * 2 * half;
        auto xr = rnd(n, -2, 2);
        const auto XR = wide(xr);
        for (int inverse : {0, 1}) {
            auto y = nans(n);
            launch(4, threads, [&] { rope_impl(xr.data(), pos.data(), inv.data(), y.data(), rows, heads, half, inverse); });
            std::vector<double> wy(n);
            for (int t = 0; t < rows; ++t)
                for (int hd = 0; hd < heads; ++hd)
                    for (int i = 0; i < half; ++i) {
                        const double a = (double)((float)pos[t] * inv[i]);
                        const double c = std::cos(a), sn = inverse ? -std::sin(a) : std::sin(a);
                        const size_t b = ((size_t)t * heads + hd) * 2 * half;
                        wy[b + i] = XR[b + i] * c - XR[b + i + half] * sn;
                        wy[b + i + half] = XR[b + i + half] * c + XR[b + i] * sn;
                    }
            expect_close(inverse ? "rope inverse" : "rope", wide(y), wy);
        }
    }

    // Gated activations over rows*h values.
    const size_t n = (size_t)rows * h;
    auto g = rnd(n, -6, 6), u = rnd(n, -2, 2);
    const auto G = wide(g), U = wide(u);
    for (int kind : {0, 1}) {
        auto y = nans(n), dg = nans(n), du = nans(n);
        launch(4, threads, [&] { gated_act_fwd_impl(g.data(), u.data(), y.data(), n, kind); });
        launch(4, threads, [&] { gated_act_bwd_impl(g.data(), u.data(), dy.data(), dg.data(), du.data(), n, kind); });
        std::vector<double> wy(n), wdg(n), wdu(n);
        for (size_t i = 0; i < n; ++i) {
            double a, da;
            if (kind == 0) {
                const double sg = 1 / (1 + std::exp(-G[i]));
                a = G[i] * sg;
                da = sg * (1 + G[i] * (1 - sg));
            } else {
                const double k = 0.7978846, c = 0.044715, t = std::tanh(k * (G[i] + c * G[i] * G[i] * G[i]));
                a = 0.5 * G[i] * (1 + t);
                da = 0.5 * (1 + t) + 0.5 * G[i] * (1 - t * t) * k * (1 + 3 * c * G[i] * G[i]);
            }
            wy[i] = a * U[i];
            wdg[i] = DY[i] * U[i] * da;
            wdu[i] = DY[i] * a;
        }
        expect_close(kind ? "geglu" : "swiglu", wide(y), wy);
        expect_close(kind ? "geglu grad gate" : "swiglu grad gate", wide(dg), wdg);
        expect_close(kind ? "geglu grad up" : "swiglu grad up", wide(du), wdu);
    }
}

int main() {
    for (unsigned th : {64u, 256u}) {
        test_ce(1, 1, 0, -100, 1.0f, 4, th);
        test_ce(3, 2, 0, -100, 1.0f, 4, th);
        test_ce(5, 7, 2, -100, 0.5f, 4, th);
        test_ce(9, 255, 3, -100, 1.0f, 4, th);
        test_ce(7, 1000, 4, 3, 1.0f, 4, th);
        test_ce(3, 32001, 3, -100, 2.0f, 30, th);
        test_ce(4, 50, 1, -100, 1.0f, 4, th);
    }
    test_ce(130, 33, 3, -100, 1.0f, 4, 64);
    for (unsigned th : {64u, 256u}) {
        test_rows<float>(1, 4, th, "f32");
        test_rows<float>(7, 132, th, "f32");
        test_rows<float>(33, 1000, th, "f32");
        test_rows<bf16_t>(7, 132, th, "bf16");
        test_rows<bf16_t>(33, 1000, th, "bf16");
    }
    test_opt(70001, 64, 300);
    test_emb(1, 1, 1, 1, 64);
    test_emb(7, 3, 20, 3, 64);
    test_emb(1000, 37, 300, 1000, 64);
    test_emb(300, 300, 50, 5, 256);
    test_emb(10, 300, 100, 1, 64);
    test_opt(1, 64, 4);
    test_opt(1000, 64, 4);
    test_opt(70001, 256, 16);
    test_grads({1, 1000, 70001}, 64, 16);
    test_adalomo(1, 1, true, 64, 4);
    test_adalomo(37, 70, true, 64, 5);
    test_adalomo(300, 33, true, 256, 300);
    test_adalomo(1, 1000, false, 64, 3);
    test_adalomo(1, 5, false, 256, 4);
    test_grads({5, 4096}, 256, 64);
    for (unsigned th : {64u, 256u}) {
        test_elementwise<float, float>(1, 1, th, 4, "f32/f32");
        test_elementwise<float, float>(37, 129, th, 5, "f32/f32");
        test_elementwise<float, bf16_t>(64, 96, th, 300, "f32/bf16");
        test_elementwise<bf16_t, float>(300, 33, th, 7, "bf16/f32");
        test_elementwise<bf16_t, bf16_t>(5, 1000, th, 300, "bf16/bf16");
        test_dora_norm<float>(1, 1, 1, 2.0f, th, "f32");
        test_dora_norm<float>(19, 300, 16, 2.0f, th, "f32");
        test_dora_norm<bf16_t>(64, 128, 8, 0.5f, th, "bf16");
        test_dora_norm<bf16_t>(13, 520, 256, 1.0f, th, "bf16");
    }
    printf("%d failures\n", fails);
    return fails != 0;
}
