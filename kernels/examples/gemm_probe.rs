//! bf16 products at one shape, dense and NF4, timed round-robin (best of
//! 20 rounds each), so that the machine's slow phases hit every variant
//! alike: dense `a·b`, `a·bᵀ` (`a` `[M, K]`) and `aᵀ·b` (`a` `[K, M]`), the NF4 linear forward
//! `x·Wᵀ` (W `[N, K]` in NF4) and its input gradient `dy·W`, and the
//! forward with LoRA's rank-16 term summed in (`x·Wᵀ + 2·ax·Bᵀ`, the
//! fused group a training step runs; its GFLOP/s count the NF4 product
//! only, so it reads directly against `nf4 x·Wᵀ`).
//!
//! `cargo run --release -p graft-kernels --example gemm_probe -- M K N [V]`
//! (the issue-6 workload's MLP: `1024 1024 2816`); `V` (0–5, in the order
//! above) times that variant alone, for a profile of it.

use graft_kernels::bf16;
use graft_kernels::gemm::{gemm, gemm_sum, nf4_gemm, Operand, Term};
use graft_kernels::nf4::quantize;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (m, k, n, only) = match args[..] {
        [m, k, n] => (m, k, n, None),
        [m, k, n, v] if v < 6 => (m, k, n, Some(v)),
        _ => (0, 0, 0, None),
    };
    if m * k * n == 0 {
        eprintln!("usage: gemm_probe M K N [V] (positive integers; V a variant, 0-5)");
        std::process::exit(2);
    }
    let val = |i: usize, p: usize| ((i * p) % 1000) as f32 / 1000.0 - 0.5;
    // Cache-line aligned, as the executor's arena is.
    let mut a_store: Vec<bf16> = vec![bf16::from_f32(0.0); m * k + 32];
    let off = a_store.as_ptr().align_offset(64);
    let a = &mut a_store[off..off + m * k];
    a.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = bf16::from_f32(val(i, 7919)));
    let a = &*a;
    let b: Vec<bf16> = (0..k * n).map(|i| bf16::from_f32(val(i, 104729))).collect();
    let wf: Vec<f32> = (0..n * k).map(|i| val(i, 15485863) * 0.05).collect();
    let packed = quantize(&wf, 64).expect("N·K is a multiple of 64");
    let w = packed.view(n, k);
    let dy: Vec<bf16> = (0..m * n).map(|i| bf16::from_f32(val(i, 7919))).collect();
    let mut c = vec![bf16::from_f32(0.0); m * n];
    let mut dx = vec![bf16::from_f32(0.0); m * k];
    const R: usize = 16;
    let ax: Vec<f32> = (0..m * R).map(|i| val(i, 31) * 0.1).collect();
    let lb: Vec<f32> = (0..n * R).map(|i| val(i, 37) * 0.1).collect();
    let lora = [
        Term {
            a: Operand::Bf16(a),
            b: Operand::Nf4(&w),
            k,
            ta: false,
            tb: true,
            scale: 1.0,
        },
        Term {
            a: Operand::F32(&ax),
            b: Operand::F32(&lb),
            k: R,
            ta: false,
            tb: true,
            scale: 2.0,
        },
    ];
    let names = [
        "dense a·b",
        "dense a·bᵀ",
        "dense aᵀ·b",
        "nf4 x·Wᵀ",
        "nf4 dy·W",
        "nf4+lora",
    ];
    let mut best = [f64::MAX; 6];
    for _ in 0..20 {
        for (v, t) in best.iter_mut().enumerate() {
            if only.is_some_and(|o| o != v) {
                continue;
            }
            let s = Instant::now();
            match v {
                0 => gemm(a, &b, &mut c, m, k, n, false, false),
                1 => gemm(a, &b, &mut c, m, k, n, false, true),
                2 => gemm(a, &b, &mut c, m, k, n, true, false),
                3 => nf4_gemm(a, &w, m, true, true, &mut c),
                4 => nf4_gemm(&dy, &w, m, false, true, &mut dx),
                _ => gemm_sum(&lora, None, None, &mut c, (m, n), true),
            }
            *t = t.min(s.elapsed().as_secs_f64());
        }
    }
    let flops = 2.0 * (m * k * n) as f64;
    for (name, t) in names.iter().zip(best).filter(|(_, t)| *t < f64::MAX) {
        println!("{m}x{k}x{n} {name:11} {:7.1} GFLOP/s", flops / t / 1e9);
    }
}
