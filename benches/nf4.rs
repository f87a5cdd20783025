//! The cost of 4-bit weights: the NF4 linear (forward and input gradient,
//! dequantizing tile by tile) beside the dense f32 matmul of the same shapes.
//!
//! Run: `cargo bench --bench nf4`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use graft::engine::rng::Rng;
use graft::kernels::matmul::matmul;
use graft::kernels::nf4::{nf4_matmul, quantize};

fn bench(c: &mut Criterion) {
    let m = 512;
    let mut rng = Rng::new(0);
    for (n, k) in [(4096, 4096), (11008, 4096)] {
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.02).collect();
        let p = quantize(&w, 64).unwrap();
        let view = p.view(n, k);
        let x: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let dy: Vec<f32> = (0..m * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut y = vec![0f32; m * n];
        let mut dx = vec![0f32; m * k];
        let mut g = c.benchmark_group(format!("linear M={m} K={k} N={n}"));
        g.sample_size(10)
            .throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function("nf4 forward", |b| {
            b.iter(|| nf4_matmul(&x, &view, m, true, false, &mut y))
        });
        g.bench_function("f32 forward", |b| {
            b.iter(|| matmul(&x, &w, &mut y, m, k, n, false, true))
        });
        g.bench_function("nf4 input-grad", |b| {
            b.iter(|| nf4_matmul(&dy, &view, m, false, false, &mut dx))
        });
        g.bench_function("f32 input-grad", |b| {
            b.iter(|| matmul(&dy, &w, &mut dx, m, n, k, false, false))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
