//! The NF4 GEMM on a GPU beside cuBLAS's bf16 GEMM on the same shapes
//! (forward and input gradient), as criterion benches, then a short table of
//! medians, TFLOP/s and the ratio to cuBLAS; then generation's NF4 GEMV
//! (1 and 8 rows) against dequantize + cuBLAS, and causal attention
//! forward and backward at the 7B step's shape. Without a GPU it says so
//! and exits.
//!
//! Run: `cargo bench --bench gpu` (scripts/gpu-check.sh runs it).

#[cfg(feature = "cuda")]
mod gpu {
    use criterion::Criterion;
    use cudarc::cublas::sys::cublasOperation_t;
    use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
    use cudarc::driver::CudaSlice;
    use graft::engine::rng::Rng;
    use graft::kernels::attention::AttnShape;
    use graft::kernels::bf16;
    use graft::kernels::cuda::{
        AttentionKernels, DeviceNf4, DeviceSegments, Gpu, LoraTerm, Nf4Epilogue, Nf4Gemm,
    };
    use graft::kernels::nf4::quantize;
    use std::time::{Duration, Instant};

    const SHAPES: [(usize, usize, usize); 4] = [
        (4096, 4096, 4096),
        (4096, 4096, 11008),
        (512, 4096, 4096),
        (512, 4096, 11008),
    ];

    struct Case {
        m: usize,
        k: usize,
        n: usize,
        w: DeviceNf4,
        x: CudaSlice<bf16>,
        dy: CudaSlice<bf16>,
        y: CudaSlice<bf16>,
        dx: CudaSlice<bf16>,
        wd: CudaSlice<bf16>,
        // W dequantized on the device, for the dequantize-then-cuBLAS ops.
        wq: CudaSlice<bf16>,
        // LoRA's rank-16 factors for the fused forward: `ax [m, r]`, `lb [n, r]`.
        ax: CudaSlice<f32>,
        lb: CudaSlice<f32>,
    }

    const RANK: usize = 16;

    fn random_bf16(rng: &mut Rng, n: usize, scale: f32) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.normal() * scale))
            .collect()
    }

    fn case(gpu: &Gpu, m: usize, k: usize, n: usize) -> Case {
        let mut rng = Rng::new((m * 31 + n) as u64);
        let w: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.02).collect();
        let p = quantize(&w, 64).unwrap();
        let view = p.view(n, k);
        let s = gpu.stream();
        let wd: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        Case {
            m,
            k,
            n,
            w: DeviceNf4::upload(gpu, &view).unwrap(),
            x: s.clone_htod(&random_bf16(&mut rng, m * k, 1.0)).unwrap(),
            dy: s.clone_htod(&random_bf16(&mut rng, m * n, 1.0)).unwrap(),
            y: s.alloc_zeros(m * n).unwrap(),
            dx: s.alloc_zeros(m * k).unwrap(),
            wd: s.clone_htod(&wd).unwrap(),
            wq: s.alloc_zeros(n * k).unwrap(),
            ax: s
                .clone_htod(&(0..m * RANK).map(|_| rng.normal()).collect::<Vec<f32>>())
                .unwrap(),
            lb: s
                .clone_htod(
                    &(0..n * RANK)
                        .map(|_| rng.normal() * 0.01)
                        .collect::<Vec<f32>>(),
                )
                .unwrap(),
        }
    }

    /// Row-major `c[m,n] = a[m,k]·op(b)` through cuBLAS, `b` stored
    /// `[k, n]`, or `[n, k]` when `tb` (a weight as stored: the forward's
    /// layout). cuBLAS is column-major, so this computes cᵀ = op(b)ᵀ·aᵀ.
    #[allow(clippy::too_many_arguments)]
    fn cublas(
        blas: &CudaBlas,
        a: &CudaSlice<bf16>,
        b: &CudaSlice<bf16>,
        c: &mut CudaSlice<bf16>,
        m: usize,
        k: usize,
        n: usize,
        tb: bool,
    ) {
        let cfg = GemmConfig {
            transa: match tb {
                true => cublasOperation_t::CUBLAS_OP_T,
                false => cublasOperation_t::CUBLAS_OP_N,
            },
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: bf16::ONE,
            lda: (if tb { k } else { n }) as i32,
            ldb: k as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: the buffers hold k·n, m·k and m·n values.
        unsafe { blas.gemm(cfg, b, a, c) }.unwrap();
    }

    /// The timed operations of a case: each fused NF4 product beside
    /// cuBLAS's, the forward with LoRA's term in its epilogue (its cost is
    /// the difference to the plain forward), and each product as the GPU
    /// executor runs it: W dequantized to bf16, then cuBLAS (and the
    /// dequantization alone).
    const OPS: [&str; 8] = [
        "nf4 forward",
        "cublas bf16 forward",
        "nf4 input-grad",
        "cublas bf16 input-grad",
        "nf4 forward + LoRA r=16",
        "dequantize + cublas forward",
        "dequantize + cublas input-grad",
        "dequantize",
    ];

    fn launch(op: usize, c: &mut Case, gemm: &Nf4Gemm, blas: &CudaBlas) {
        let (m, k, n) = (c.m, c.k, c.n);
        match op {
            0 => gemm.run(&c.x, &c.w, m, true, &mut c.y).unwrap(),
            // Same FLOPs and operand sizes as x·Wᵀ: [m,k]·[k,n].
            1 => cublas(blas, &c.x, &c.wd, &mut c.y, m, k, n, false),
            2 => gemm.run(&c.dy, &c.w, m, false, &mut c.dx).unwrap(),
            3 => cublas(blas, &c.dy, &c.wd, &mut c.dx, m, n, k, false),
            5..=7 => {
                gemm.dequantize(&c.w, &mut c.wq).unwrap();
                match op {
                    5 => cublas(blas, &c.x, &c.wq, &mut c.y, m, k, n, true),
                    6 => cublas(blas, &c.dy, &c.wq, &mut c.dx, m, n, k, false),
                    _ => {}
                }
            }
            _ => {
                let lora = LoraTerm {
                    a: &c.ax,
                    b: &c.lb,
                    r: RANK,
                    scale: 2.0,
                };
                let epi = Nf4Epilogue {
                    lora: Some(lora),
                    ..Default::default()
                };
                gemm.run_fused(&c.x, &c.w, m, true, &epi, &mut c.y).unwrap()
            }
        }
    }

    fn timed(gpu: &Gpu, iters: u64, mut f: impl FnMut()) -> Duration {
        gpu.stream().synchronize().unwrap();
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        gpu.stream().synchronize().unwrap();
        t.elapsed()
    }

    pub fn main() {
        let gpu = match Gpu::open(0) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("SKIPPED (no usable GPU): {e}");
                return;
            }
        };
        println!("GPU: {} ({})", gpu.name(), gpu.arch());
        let gemm = Nf4Gemm::new(&gpu).unwrap();
        let blas = CudaBlas::new(gpu.stream().clone()).unwrap();
        let mut cases: Vec<Case> = SHAPES
            .iter()
            .map(|&(m, k, n)| case(&gpu, m, k, n))
            .collect();

        let mut crit = Criterion::default()
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .configure_from_args();
        for c in cases.iter_mut() {
            let mut g = crit.benchmark_group(format!("M={} K={} N={}", c.m, c.k, c.n));
            for (op, name) in OPS.iter().enumerate() {
                g.bench_function(*name, |b| {
                    b.iter_custom(|iters| timed(&gpu, iters, || launch(op, c, &gemm, &blas)))
                });
            }
            g.finish();
        }
        crit.final_summary();

        // The table: 7 rounds, each a batch of 20 launches of every op in
        // turn (after warm-up), so that a slow phase of the GPU's clocks
        // falls on every op alike; times are the median round's, ratios
        // the median of each round's ratio.
        println!("\n| M | K | N | op | ms | TFLOP/s | vs cuBLAS |");
        println!("|---|---|---|---|---|---|---|");
        for c in cases.iter_mut() {
            let flops = 2.0 * (c.m * c.k * c.n) as f64;
            for op in 0..OPS.len() {
                timed(&gpu, 5, || launch(op, c, &gemm, &blas));
            }
            let rounds: Vec<[f64; OPS.len()]> = (0..7)
                .map(|_| {
                    std::array::from_fn(|op| {
                        let t = timed(&gpu, 20, || launch(op, c, &gemm, &blas));
                        t.as_secs_f64() * 1e3 / 20.0
                    })
                })
                .collect();
            let median = |f: &dyn Fn(&[f64; OPS.len()]) -> f64| {
                let mut v: Vec<f64> = rounds.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let ms: [f64; OPS.len()] = std::array::from_fn(|op| median(&|r| r[op]));
            // cuBLAS's time over op's, round by round.
            let vs = |reference: usize, op: usize| median(&|r| r[reference] / r[op]);
            for (op, name) in OPS.iter().enumerate() {
                let ratio = match op {
                    0 | 2 => format!("{:.0}%", 100.0 * vs(op + 1, op)),
                    4 => format!(
                        "{:.0}% (+{:.0}% over nf4 forward)",
                        100.0 * vs(1, 4),
                        100.0 * (median(&|r| r[4] / r[0]) - 1.0)
                    ),
                    5 | 6 => format!("{:.0}%", 100.0 * vs(2 * op - 9, op)),
                    // Bytes moved: the 4-bit codes and one absmax code per 64
                    // read, the bf16 weight written.
                    7 => format!(
                        "{:.0} GB/s",
                        (c.n * c.k) as f64 * (0.5 + 2.0 + 1.0 / 64.0) / (ms[op] * 1e-3) / 1e9
                    ),
                    _ => "-".into(),
                };
                let tflops = match op {
                    7 => "-".to_string(),
                    _ => format!("{:.0}", flops / (ms[op] * 1e-3) / 1e12),
                };
                println!(
                    "| {} | {} | {} | {name} | {:.3} | {tflops} | {ratio} |",
                    c.m, c.k, c.n, ms[op]
                );
            }
        }
        gemv_table(&gpu, &gemm, &blas);
        attention_table(&gpu);
    }

    /// Generation's products (a few rows of x against a 7B layer's
    /// weights): the NF4 GEMV, which reads the 4-bit codes once, against
    /// the executor's path for many rows (dequantize, then cuBLAS).
    fn gemv_table(gpu: &Gpu, gemm: &Nf4Gemm, blas: &CudaBlas) {
        let s = gpu.stream();
        println!("\n| M | K | N | nf4 gemv | GB/s of codes | dequantize + cublas |");
        println!("|---|---|---|---|---|---|");
        for (k, n) in [(4096, 4096), (4096, 11008), (11008, 4096)] {
            let c = case(gpu, 1, k, n);
            let mut wq = s.alloc_zeros::<bf16>(n * k).unwrap();
            for m in [1, 8] {
                let x = s
                    .clone_htod(&random_bf16(&mut Rng::new(3), m * k, 1.0))
                    .unwrap();
                let mut y = s.alloc_zeros::<bf16>(m * n).unwrap();
                let gemv = median_ms(gpu, 20, || {
                    gemm.gemv(&x, &c.w, m, 1.0, 0.0, &mut y).unwrap()
                });
                let deq = median_ms(gpu, 20, || {
                    gemm.dequantize(&c.w, &mut wq).unwrap();
                    cublas(blas, &x, &wq, &mut y, m, k, n, true);
                });
                let gbs = (n * k) as f64 * (0.5 + 1.0 / 64.0) / (gemv * 1e-3) / 1e9;
                println!("| {m} | {k} | {n} | {gemv:.4} ms | {gbs:.0} | {deq:.4} ms |");
            }
        }
    }

    /// Milliseconds per launch of `f`: the median of 7 batches of `n`
    /// launches, after 5 to warm up.
    fn median_ms(gpu: &Gpu, n: u64, mut f: impl FnMut()) -> f64 {
        timed(gpu, 5, &mut f);
        let mut runs: Vec<f64> = (0..7)
            .map(|_| timed(gpu, n, &mut f).as_secs_f64() * 1e3 / n as f64)
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[3]
    }

    /// Causal attention over one sequence: the 7B step's shape (2048
    /// tokens, 32 heads of 128) and a longer one with GQA. TFLOP/s count
    /// the visible half of the scores as flash-attention's figures do: two
    /// products forward (4·t²·d·heads / 2), five backward (2.5 times that;
    /// Graft's backward runs seven, recomputing the scores for dq).
    fn attention_table(gpu: &Gpu) {
        let kernels = AttentionKernels::new(gpu).unwrap();
        let s = gpu.stream();
        let mut rng = Rng::new(7);
        println!("\n| tokens | heads / kv heads | d | pass | ms | TFLOP/s |");
        println!("|---|---|---|---|---|---|");
        for (t, heads, kv, d) in [(2048, 32, 32, 128), (4096, 32, 8, 128)] {
            let shape = AttnShape {
                tokens: t,
                n_heads: heads,
                n_kv_heads: kv,
                head_dim: d,
                scale: 1.0 / (d as f32).sqrt(),
                window: None,
            };
            let (qn, kn) = (t * heads * d, t * kv * d);
            let mut up = |n: usize| s.clone_htod(&random_bf16(&mut rng, n, 1.0)).unwrap();
            let (q, k, v, dout) = (up(qn), up(kn), up(kn), up(qn));
            let seg = DeviceSegments::upload(gpu, &vec![0; t]).unwrap();
            let mut out = s.alloc_zeros::<bf16>(qn).unwrap();
            let mut lse = s.alloc_zeros::<f32>(t * heads).unwrap();
            let mut delta = s.alloc_zeros::<f32>(t * heads).unwrap();
            let (mut dq, mut dk, mut dv) = (
                s.alloc_zeros::<bf16>(qn).unwrap(),
                s.alloc_zeros::<bf16>(kn).unwrap(),
                s.alloc_zeros::<bf16>(kn).unwrap(),
            );
            let fwd = median_ms(gpu, 10, || {
                kernels
                    .forward(&q, &k, &v, &seg, shape, &mut out, &mut lse)
                    .unwrap()
            });
            let bwd = median_ms(gpu, 10, || {
                kernels
                    .backward(
                        &q, &k, &v, &seg, &out, &lse, &dout, shape, &mut delta, &mut dq, &mut dk,
                        &mut dv,
                    )
                    .unwrap()
            });
            let flops = 2.0 * (t * t * d * heads) as f64;
            for (pass, ms, f) in [("forward", fwd, flops), ("backward", bwd, 2.5 * flops)] {
                let tflops = f / (ms * 1e-3) / 1e12;
                println!("| {t} | {heads} / {kv} | {d} | {pass} | {ms:.3} | {tflops:.0} |");
            }
        }
    }
}

fn main() {
    #[cfg(feature = "cuda")]
    gpu::main();
    #[cfg(not(feature = "cuda"))]
    eprintln!("SKIPPED: built without the `cuda` feature");
}
