//! f32 GEMM: every path of `kernels::gemm` (the SIMD ones beside the scalar
//! reference) at the shapes issue 6 compares with OpenBLAS
//! (`benches/peers/numpy_gemm.py` times numpy at the same shapes).
//!
//! Run: `cargo bench --bench gemm` (throughput is in multiply-adds ×2, so
//! criterion's "Gelem/s" reads as GFLOP/s). The reference kernel takes
//! seconds per product at the large shapes; `-- avx512` skips it.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use graft::engine::rng::Rng;
use graft::kernels::gemm::{sgemm_on, Path};

fn bench(c: &mut Criterion) {
    let mut rng = Rng::new(0);
    // (m, k, n, tb): a@b as numpy computes it, and the linear layer's x·Wᵀ.
    for (m, k, n, tb) in [
        (128, 256, 256, false),
        (512, 4096, 4096, false),
        (512, 4096, 4096, true),
        (2048, 2048, 2048, false),
    ] {
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut out = vec![0f32; m * n];
        let layout = if tb { "a·bᵀ" } else { "a·b" };
        let mut g = c.benchmark_group(format!("sgemm {m}x{k}x{n} {layout}"));
        g.sample_size(10)
            .throughput(Throughput::Elements((2 * m * k * n) as u64));
        for path in Path::ALL.into_iter().filter(|p| p.is_supported()) {
            g.bench_function(path.name(), |bench| {
                bench.iter(|| sgemm_on(path, &a, &b, &mut out, m, k, n, false, tb))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
