//! The AVX512-BF16 micro-kernel: a 12×32 tile of `c` in 24 zmm f32
//! accumulators, fed by `vdpbf16ps`, which multiplies 16 pairs of bf16 per
//! vector and adds both products to each f32 lane: twice the multiply-adds
//! of an f32 FMA per instruction, from half the bytes of packed panels.
//!
//! Per step (two k): two 64-byte loads of the B panel (32 columns × a pair)
//! and 12 pair broadcasts of the A panel feed 24 dot products. 12 rows, not
//! the f32 kernel's 14: measured on Zen 4 (gemm_probe, alternated), equal
//! at large M and 4-7% faster at M = 128 (a 7B step's tokens: ten 14-row
//! panels for 128 rows were 9% padding, eleven 12-row ones are 3%).

use super::block::Micro;
use super::operand::Pair;
use std::arch::x86_64::*;

const MR: usize = 12;
const NR: usize = 32;

/// The f32 kernel's blocking in bytes (pairs are 4 bytes like an f32): an
/// A panel is 12×384 pairs = 18 KiB, a B slab 384×640 pairs = 960 KiB, now
/// covering 768 k.
pub(super) static MICRO: Micro<Pair> = Micro {
    mr: MR,
    nr: NR,
    kc: 768,
    mc: 84 * MR,
    nc: 20 * NR,
    step_align: 1,
    a_tiled: false,
    kernel,
    rows_kernel: Some(rows_kernel),
    rows_align: 4,
    // Measured (gemm_probe, one core, with 14-row tiles): 14 rows 2 KiB
    // apart (7 to a set) read in place 2-4% faster than packed; 4 or 8 KiB
    // apart (all 14 in one set) 20% slower.
    rows_per_set: 7,
    setup: None,
};

/// See [`super::block::Kernel`] for the contract.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel(
    steps: usize,
    a: *const Pair,
    b: *const Pair,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { tile::<true>(steps, a.cast(), 0, b, c, ldc, accumulate) }
}

/// See [`super::block::RowsKernel`] for the contract: A's pairs read
/// straight from 12 stored rows `lda` bf16 apart, which saves the pass
/// that packing them would be when few columns reuse the panel (LoRA's
/// `x·Aᵀ` and `dy·B`).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_kernel(
    steps: usize,
    a: *const u16,
    lda: usize,
    b: *const Pair,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    // SAFETY: the caller's contract.
    unsafe { tile::<false>(steps, a.cast(), lda * 2, b, c, ldc, accumulate) }
}

/// The kernel over a packed A panel (MR pairs a step), or over stored rows
/// `row_bytes` apart (a pair of each a step); a constant parameter, so
/// that the packed panel's offsets compile to immediates.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const PACKED: bool>(
    steps: usize,
    a: *const u8,
    row_bytes: usize,
    b: *const Pair,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let (a_row, a_step) = match PACKED {
        true => (4, MR * 4),
        false => (row_bytes, 4),
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let b = b.cast::<__m512i>();
    // SAFETY: the caller's contract (see `Kernel`): every pointer below
    // stays inside the panels and the tile it describes. The transmutes
    // reinterpret 64 bytes of packed pairs as the 32 bf16 they are.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                let ci = c.add(i * ldc);
                row[0] = _mm512_loadu_ps(ci);
                row[1] = _mm512_loadu_ps(ci.add(16));
            }
        }
        for s in 0..steps {
            let bp = b.add(2 * s);
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(1)));
            let ap = a.add(s * a_step);
            for (i, row) in acc.iter_mut().enumerate() {
                let pair = ap.add(i * a_row).cast::<u32>().read_unaligned();
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair as i32));
                row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            let ci = c.add(i * ldc);
            _mm512_storeu_ps(ci, row[0]);
            _mm512_storeu_ps(ci.add(16), row[1]);
        }
    }
}
