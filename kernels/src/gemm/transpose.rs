//! Transposed packing's scatter: runs of 16 stored rows (16 columns of a
//! panel) written out step by step. A panel wants one step of k for all its
//! columns side by side, and a transposed operand stores each column's k
//! contiguous, so a column-at-a-time copy writes one element every `nr`:
//! scalar stores. Up to 16 columns at a time go through a 16×16 register
//! transpose on AVX-512 instead, a whole step per (masked) store.

use crate::simd::has_avx512;

/// Rows read per group: the transpose's width.
pub(super) const GROUP: usize = 16;

/// `dst[s·nr + c] = rows[c][s]` for `c < rows.len()` (at most 16) and
/// `s < steps`, 32-bit elements; nothing else of `dst` is written.
#[inline(always)]
pub(super) fn scatter(rows: &[&[u32]], steps: usize, dst: &mut [u32], nr: usize) {
    let g = rows.len();
    debug_assert!(g <= GROUP && rows.iter().all(|r| r.len() >= steps));
    if steps == 0 || g == 0 {
        return;
    }
    assert!(dst.len() >= (steps - 1) * nr + g);
    if has_avx512() {
        for s0 in (0..steps).step_by(GROUP) {
            // SAFETY: avx512f is on (the active path is an AVX-512 one);
            // every access is in bounds (checked above and by the slices).
            unsafe { x86::block(rows, s0, GROUP.min(steps - s0), &mut dst[s0 * nr..], nr) };
        }
        return;
    }
    for s in 0..steps {
        for (c, r) in rows.iter().enumerate() {
            dst[s * nr + c] = r[s];
        }
    }
}

mod x86 {
    use super::GROUP;
    use std::arch::x86_64::*;

    /// Steps `s0..s0+w` (w ≤ 16) of `rows` (at most 16), transposed into
    /// `dst[i·nr..][..rows.len()]`: missing rows are zeros in registers and
    /// never stored, missing steps are neither loaded nor stored.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(rows: &[&[u32]], s0: usize, w: usize, dst: &mut [u32], nr: usize) {
        let g = rows.len();
        assert!(g <= GROUP && (1..=GROUP).contains(&w) && dst.len() >= (w - 1) * nr + g);
        let steps: __mmask16 = ((1u32 << w) - 1) as u16;
        let cols: __mmask16 = ((1u32 << g) - 1) as u16;
        let r: [__m512i; 16] = std::array::from_fn(|c| match rows.get(c) {
            Some(row) => _mm512_maskz_loadu_epi32(steps, row[s0..s0 + w].as_ptr().cast()),
            None => _mm512_setzero_si512(),
        });
        let t = transpose(r);
        for (i, v) in t.iter().take(w).enumerate() {
            _mm512_mask_storeu_epi32(dst[i * nr..][..g].as_mut_ptr().cast(), cols, *v);
        }
    }

    /// A 16×16 matrix of 32-bit lanes transposed: within each 128-bit lane,
    /// 4×4 blocks by 32- and 64-bit unpacks; then the 4×4 matrix of lanes by
    /// two rounds of lane shuffles.
    #[inline(always)]
    unsafe fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        // u[4g + i], within 128-bit lane l: column 4l+i of rows 4g..4g+4.
        let mut u = [_mm512_setzero_si512(); 16];
        for g in 0..4 {
            let [a, b, c, d] = [r[4 * g], r[4 * g + 1], r[4 * g + 2], r[4 * g + 3]];
            let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
            let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
            u[4 * g] = _mm512_unpacklo_epi64(t0, t2);
            u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
            u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
            u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
        }
        // 0x88 takes lanes 0 and 2 of each operand, 0xDD lanes 1 and 3.
        let mut v = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            v[i] = _mm512_shuffle_i32x4::<0x88>(u[i], u[4 + i]);
            v[4 + i] = _mm512_shuffle_i32x4::<0xDD>(u[i], u[4 + i]);
            v[8 + i] = _mm512_shuffle_i32x4::<0x88>(u[8 + i], u[12 + i]);
            v[12 + i] = _mm512_shuffle_i32x4::<0xDD>(u[8 + i], u[12 + i]);
        }
        let mut out = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            out[i] = _mm512_shuffle_i32x4::<0x88>(v[i], v[8 + i]);
            out[8 + i] = _mm512_shuffle_i32x4::<0xDD>(v[i], v[8 + i]);
            out[4 + i] = _mm512_shuffle_i32x4::<0x88>(v[4 + i], v[12 + i]);
            out[12 + i] = _mm512_shuffle_i32x4::<0xDD>(v[4 + i], v[12 + i]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every group width and ragged step count, against the plain copy
    /// (whichever path is active: CI runs the suite on AVX2 too).
    #[test]
    fn scatter_places_each_step_of_each_row() {
        for (g, steps, nr) in [
            (16, 16, 16),
            (16, 40, 32),
            (16, 3, 32),
            (5, 20, 16),
            (1, 1, 16),
            (16, 0, 32),
        ] {
            let rows: Vec<Vec<u32>> = (0..g)
                .map(|c| (0..steps).map(|s| (c * 1000 + s) as u32).collect())
                .collect();
            let refs: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
            let mut dst = vec![u32::MAX; steps.max(1) * nr];
            scatter(&refs, steps, &mut dst, nr);
            for s in 0..steps {
                for j in 0..nr {
                    let want = if j < g {
                        (j * 1000 + s) as u32
                    } else {
                        u32::MAX
                    };
                    assert_eq!(
                        dst[s * nr + j],
                        want,
                        "g {g} steps {steps} nr {nr}: s {s} j {j}"
                    );
                }
            }
        }
    }

    /// The AVX-512 transpose itself, whatever path is active.
    #[test]
    fn avx512_block_is_a_transpose() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let rows: Vec<Vec<u32>> = (0..16)
            .map(|c| (0..20).map(|s| (c * 100 + s) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
        let nr = 24;
        for (g, w) in [(16, 16), (14, 16), (16, 5), (3, 1), (1, 16)] {
            let mut dst = vec![7u32; 16 * nr];
            unsafe { x86::block(&refs[..g], 2, w, &mut dst, nr) };
            for i in 0..16 {
                for j in 0..nr {
                    let want = if j < g && i < w {
                        (j * 100 + 2 + i) as u32
                    } else {
                        7
                    };
                    assert_eq!(
                        dst[i * nr + j],
                        want,
                        "{g} rows, {w} steps: step {i} column {j}"
                    );
                }
            }
        }
    }
}
