//! Row and elementwise loops compiled for the CPU's widest vectors.
//!
//! The crate is compiled for baseline x86-64 (SSE2), where a plain loop
//! vectorizes four floats at a time. [`vectorized`] runs a closure inside a
//! function compiled with AVX-512 (or AVX2 + FMA) enabled, on the path the
//! GEMM takes ([`Path::active`], so `GRAFT_CPU` governs both); what is
//! inlined into it vectorizes at that width. Only the instructions change:
//! Rust neither contracts `a·b + c` into an FMA nor reorders float sums, so
//! every path gives the same bits.

#[cfg(target_arch = "x86_64")]
use crate::gemm::Path;

/// Runs `f` compiled for the active path's vector width. Keep `f` small and
/// its callees `#[inline]`: only code inlined into it gets the wide vectors.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    match Path::active() {
        // SAFETY: the active path is only ever one this CPU supports
        // (`Path::requested` / `Path::best` check its features), and every
        // AVX-512 path needs avx512f, the AVX2 one avx2 and fma.
        Path::Avx512 | Path::Avx512Bf16 | Path::Amx => return unsafe { avx512(f) },
        Path::Avx2 => return unsafe { avx2(f) },
        Path::Scalar => {}
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether the active path may use AVX-512F instructions (a kernel with an
/// AVX-512 variant asks this, so `GRAFT_CPU=avx2` keeps it off).
#[inline(always)]
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return matches!(Path::active(), Path::Avx512 | Path::Avx512Bf16 | Path::Amx);
    #[cfg(not(target_arch = "x86_64"))]
    false
}
