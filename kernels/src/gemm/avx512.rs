//! The AVX-512 micro-kernel: a 14×32 tile of `c` in 28 zmm accumulators.
//!
//! Per step of k: two 16-float loads of the B panel and 14 broadcasts of the
//! A panel (folded into the FMAs as embedded broadcasts) feed 28 FMAs, so the
//! two FMA ports, not the load ports, set the pace; 28 accumulators + 2 B
//! vectors leave 2 of the 32 registers spare.

use super::block::Micro;
use std::arch::x86_64::*;

const MR: usize = 14;
const NR: usize = 32;

/// Blocking for this machine (Xeon, 48 KiB L1d and 2 MiB L2 per core): an
/// A panel is 14×384×4 B = 21 KiB, half of L1; a B slab is 384×640×4 B =
/// 960 KiB, half of L2, leaving room for the A panels streaming through.
pub(super) static MICRO: Micro<f32> = Micro {
    mr: MR,
    nr: NR,
    kc: 384,
    mc: 72 * MR,
    nc: 20 * NR,
    step_align: 1,
    a_tiled: false,
    kernel,
    rows_kernel: None,
    rows_align: 1,
    rows_per_set: usize::MAX,
    setup: None,
};

/// See [`super::block::Kernel`] for the contract.
#[target_feature(enable = "avx512f")]
unsafe fn kernel(
    steps: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // SAFETY: the caller's contract (see `Kernel`): every pointer below
    // stays inside the panels and the tile it describes.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                let ci = c.add(i * ldc);
                row[0] = _mm512_loadu_ps(ci);
                row[1] = _mm512_loadu_ps(ci.add(16));
            }
        }
        for p in 0..steps {
            let bp = b.add(p * NR);
            let (b0, b1) = (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(16)));
            let ap = a.add(p * MR);
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
                row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let ci = c.add(i * ldc);
            _mm512_storeu_ps(ci, row[0]);
            _mm512_storeu_ps(ci.add(16), row[1]);
        }
    }
}
