//! The AVX2+FMA micro-kernel for CPUs without AVX-512: a 6×16 tile of `c`
//! in 12 ymm accumulators (BLIS's Haswell shape). Per step of k: two B
//! loads and 6 broadcasts feed 12 FMAs; 12 + 2 + 1 of the 16 registers.

use super::block::Micro;
use std::arch::x86_64::*;

const MR: usize = 6;
const NR: usize = 16;

/// Blocking for the L1 (32 KiB or more) and L2 (at least 256 KiB, usually
/// 1–2 MiB) of AVX2-era cores: an A panel is 6×256×4 B = 6 KiB; a B slab is
/// 256×512×4 B = 512 KiB.
pub(super) static MICRO: Micro<f32> = Micro {
    mr: MR,
    nr: NR,
    kc: 256,
    mc: 170 * MR,
    nc: 32 * NR,
    step_align: 1,
    a_tiled: false,
    kernel,
    rows_kernel: None,
    rows_align: 1,
    rows_per_set: usize::MAX,
    setup: None,
};

/// See [`super::block::Kernel`] for the contract.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(
    steps: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    // SAFETY: the caller's contract (see `Kernel`): every pointer below
    // stays inside the panels and the tile it describes.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                let ci = c.add(i * ldc);
                row[0] = _mm256_loadu_ps(ci);
                row[1] = _mm256_loadu_ps(ci.add(8));
            }
        }
        for p in 0..steps {
            let bp = b.add(p * NR);
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(*ap.add(i));
                row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let ci = c.add(i * ldc);
            _mm256_storeu_ps(ci, row[0]);
            _mm256_storeu_ps(ci.add(8), row[1]);
        }
    }
}
