//! The two products of a language-model head on the active path, timed
//! (best of 6): logits `x·Wᵀ` and the input gradient `d·W`, bf16, taken in
//! row chunks of `chunk` tokens (as a chunked cross-entropy would take them).
//!
//! `cargo run --release -p graft-kernels --example lmhead -- TOKENS HIDDEN VOCAB CHUNK`
//! (the issue workload's head: `1024 1024 32000 1024`).

use graft_kernels::{bf16, gemm};
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let [t, h, v, chunk] = args[..] else {
        eprintln!(
            "usage: lmhead TOKENS HIDDEN VOCAB CHUNK (positive integers, CHUNK dividing TOKENS)"
        );
        std::process::exit(2);
    };
    if !t.is_multiple_of(chunk) {
        eprintln!("CHUNK {chunk} does not divide TOKENS {t}");
        std::process::exit(2);
    }
    let x: Vec<bf16> = (0..t * h)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32 / 1000.0 - 0.5))
        .collect();
    let w: Vec<bf16> = (0..v * h)
        .map(|i| bf16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5))
        .collect();
    let mut logits = vec![bf16::from_f32(0.0); t * v];
    let mut dh = vec![bf16::from_f32(0.0); t * h];
    let (mut bf, mut bb) = (f64::MAX, f64::MAX);
    for _ in 0..6 {
        let s = Instant::now();
        for c0 in (0..t).step_by(chunk) {
            gemm::gemm(
                &x[c0 * h..(c0 + chunk) * h],
                &w,
                &mut logits[..chunk * v],
                chunk,
                h,
                v,
                false,
                true,
            );
        }
        bf = bf.min(s.elapsed().as_secs_f64());
        let s = Instant::now();
        for c0 in (0..t).step_by(chunk) {
            gemm::gemm(
                &logits[..chunk * v],
                &w,
                &mut dh[c0 * h..(c0 + chunk) * h],
                chunk,
                v,
                h,
                false,
                false,
            );
        }
        bb = bb.min(s.elapsed().as_secs_f64());
    }
    let gf = 2.0 * (t * h * v) as f64 / 1e9;
    println!(
        "{t}x{h}x{v} chunk {chunk}: x·Wᵀ {:.1} ms ({:.0} GFLOP/s), d·W {:.1} ms ({:.0} GFLOP/s)",
        bf * 1e3,
        gf / bf,
        bb * 1e3,
        gf / bb
    );
}
