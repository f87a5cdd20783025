//! The cost of 4-bit weights: the NF4 linear (forward and input gradient,
//! dequantized as its panels are packed) beside Graft's dense GEMM of the
//! same shapes in the same storage, bf16 (the QLoRA compute dtype) and f32.
//! Issue 6's target: NF4 forward ≥ 85% of the dense bf16 GEMM at M = 512.
//!
//! Run: `cargo bench --bench nf4` (GFLOP/s as "Gelem/s").

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use graft::engine::rng::Rng;
use graft::kernels::gemm::{gemm, nf4_gemm};
use graft::kernels::nf4::quantize;
use graft::kernels::{bf16, Elem};

fn linear<T: Elem>(c: &mut Criterion, dtype: &str, (m, n, k): (usize, usize, usize)) {
    let mut rng = Rng::new(0);
    let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.02).collect();
    let p = quantize(&w, 64).unwrap();
    let view = p.view(n, k);
    let cast = |v: Vec<f32>| -> Vec<T> { v.into_iter().map(T::from_f32).collect() };
    let x = cast((0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect());
    let dy = cast((0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect());
    let w = cast(w);
    let mut y = cast(vec![0f32; m * n]);
    let mut dx = cast(vec![0f32; m * k]);
    let bf16_compute = T::BF16;
    let mut g = c.benchmark_group(format!("linear {dtype} M={m} K={k} N={n}"));
    g.sample_size(10)
        .throughput(Throughput::Elements((2 * m * n * k) as u64));
    g.bench_function("nf4 forward", |b| {
        b.iter(|| nf4_gemm(&x, &view, m, true, bf16_compute, &mut y))
    });
    g.bench_function("dense forward", |b| {
        b.iter(|| gemm(&x, &w, &mut y, m, k, n, false, true))
    });
    g.bench_function("nf4 input-grad", |b| {
        b.iter(|| nf4_gemm(&dy, &view, m, false, bf16_compute, &mut dx))
    });
    g.bench_function("dense input-grad", |b| {
        b.iter(|| gemm(&dy, &w, &mut dx, m, n, k, false, false))
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    for shape in [(512, 4096, 4096), (512, 11008, 4096)] {
        linear::<bf16>(c, "bf16", shape);
        linear::<f32>(c, "f32", shape);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
