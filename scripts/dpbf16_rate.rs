//! How fast this CPU runs `vdpbf16ps` against f32 FMAs (docs/PERFORMANCE.md,
//! "Why AMX and not AVX512-BF16 here"): 24 independent accumulator chains
//! per instruction kind on one core, printed as G instructions/s.
//!
//! Run: `rustc -O -C target-cpu=native scripts/dpbf16_rate.rs -o /tmp/dpbf16_rate && /tmp/dpbf16_rate`

use std::arch::x86_64::*;
use std::time::Instant;
#[target_feature(enable = "avx512bf16,avx512f")]
unsafe fn dp(n: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 24];
    let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f803f80));
    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3f803f80));
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = _mm512_dpbf16_ps(*x, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}
#[target_feature(enable = "avx512f")]
unsafe fn fma(n: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 24];
    let b = _mm512_set1_ps(1.0001);
    let a = _mm512_set1_ps(0.9999);
    for _ in 0..n {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}
fn main() {
    let n = 20_000_000;
    let t = Instant::now();
    let r = unsafe { dp(n) };
    let d = t.elapsed().as_secs_f64();
    println!("dpbf16: {:.2} Ginst/s ({r})", (n * 24) as f64 / d / 1e9);
    let t = Instant::now();
    let r = unsafe { fma(n) };
    let d = t.elapsed().as_secs_f64();
    println!("fma: {:.2} Ginst/s ({r})", (n * 24) as f64 / d / 1e9);
}
