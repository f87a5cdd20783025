//! Causal attention forward and backward on the active path, timed (best of
//! 5) on `TOKENS` tokens in sequences of `SEQ`, `HEADS` heads of `DIM`, bf16.
//!
//! `cargo run --release -p graft-kernels --example attn -- TOKENS SEQ HEADS DIM`
//! (the issue workload's layer: `1024 256 16 64`).

use graft_kernels::attention::{attention, attention_grad, AttnShape};
use graft_kernels::bf16;
use std::time::Instant;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .filter(|&n| n > 0)
        .collect();
    let [t, seq, heads, d] = args[..] else {
        eprintln!("usage: attn TOKENS SEQ HEADS DIM (positive integers)");
        std::process::exit(2);
    };
    let w = heads * d;
    let val = |i: usize, m: usize| bf16::from_f32(((i * m) % 1000) as f32 / 500.0 - 1.0);
    let q: Vec<bf16> = (0..t * w).map(|i| val(i, 7919)).collect();
    let k: Vec<bf16> = (0..t * w).map(|i| val(i, 104729)).collect();
    let v: Vec<bf16> = (0..t * w).map(|i| val(i, 1299709)).collect();
    let dout: Vec<bf16> = (0..t * w).map(|i| val(i, 15485863)).collect();
    let seg: Vec<i32> = (0..t).map(|i| (i / seq) as i32).collect();
    let s = AttnShape {
        tokens: t,
        n_heads: heads,
        n_kv_heads: heads,
        head_dim: d,
        scale: 1.0 / (d as f32).sqrt(),
        window: None,
    };
    let zero = bf16::from_f32(0.0);
    let (mut out, mut lse) = (vec![zero; t * w], vec![0f32; t * heads]);
    let (mut dq, mut dk, mut dv) = (vec![zero; t * w], vec![zero; t * w], vec![zero; t * w]);
    let (mut fwd, mut bwd) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t0 = Instant::now();
        attention(&q, &k, &v, &seg, s, &mut out, &mut lse);
        fwd = fwd.min(t0.elapsed().as_secs_f64());
        let t0 = Instant::now();
        attention_grad(
            &q, &k, &v, &seg, &out, &lse, &dout, s, &mut dq, &mut dk, &mut dv,
        );
        bwd = bwd.min(t0.elapsed().as_secs_f64());
    }
    // Causal: half the scores of each sequence (the diagonal counted once).
    let pairs = (t / seq) as f64 * (seq * (seq + 1) / 2) as f64;
    let flops = 4.0 * pairs * (heads * d) as f64;
    println!(
        "attention {t} tokens ({seq} per sequence), {heads}x{d}: forward {:.2} ms ({:.1} GFLOP/s), backward {:.2} ms ({:.1} GFLOP/s)",
        fwd * 1e3,
        flops / fwd / 1e9,
        bwd * 1e3,
        2.5 * flops / bwd / 1e9
    );
}
