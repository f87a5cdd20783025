//! Dense GEMM: every path of `kernels::gemm` (the SIMD ones beside the
//! scalar reference) at the shapes issue 6 compares with OpenBLAS and
//! torch (`benches/peers/numpy_gemm.py` times numpy and torch at the same
//! shapes), in f32 and bf16 storage.
//!
//! Run: `cargo bench --bench gemm` (throughput is in multiply-adds ×2, so
//! criterion's "Gelem/s" reads as GFLOP/s). The reference kernel takes
//! seconds per product at the large shapes; `-- avx512` skips it.

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use graft::engine::rng::Rng;
use graft::kernels::gemm::{gemm_on, Path};
use graft::kernels::{bf16, Elem};

/// `v` as `T` in a buffer where it starts on a 64-byte line (returned with
/// its offset), as the executor's arena places every value: AMX and the
/// AVX512-BF16 kernel read a's rows in place only when they are aligned.
fn aligned<T: Elem>(v: &[f32]) -> (Vec<T>, usize) {
    let mut store = vec![T::from_f32(0.0); v.len() + 64];
    let off = store.as_ptr().align_offset(64);
    store[off..off + v.len()]
        .iter_mut()
        .zip(v)
        .for_each(|(d, &s)| *d = T::from_f32(s));
    (store, off)
}

/// One product on every supported path.
#[allow(clippy::too_many_arguments)]
fn paths<T: Elem>(
    g: &mut BenchmarkGroup<WallTime>,
    a: &[f32],
    b: &[f32],
    (m, k, n, tb): (usize, usize, usize, bool),
) {
    let ((a, ao), (b, bo)) = (aligned::<T>(a), aligned::<T>(b));
    let (a, b) = (&a[ao..ao + m * k], &b[bo..bo + k * n]);
    let (mut out, oo) = aligned::<T>(&vec![0.0; m * n]);
    let out = &mut out[oo..oo + m * n];
    for path in Path::ALL.into_iter().filter(|p| p.is_supported()) {
        g.bench_function(path.name(), |bench| {
            bench.iter(|| gemm_on(path, a, b, out, m, k, n, false, tb))
        });
    }
}

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
        let layout = if tb { "a·bᵀ" } else { "a·b" };
        for dtype in ["f32", "bf16"] {
            let mut g = c.benchmark_group(format!("gemm {dtype} {m}x{k}x{n} {layout}"));
            g.sample_size(10)
                .throughput(Throughput::Elements((2 * m * k * n) as u64));
            match dtype {
                "f32" => paths::<f32>(&mut g, &a, &b, (m, k, n, tb)),
                _ => paths::<bf16>(&mut g, &a, &b, (m, k, n, tb)),
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
