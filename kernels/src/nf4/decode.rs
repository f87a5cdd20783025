//! Packed NF4 codes to values through a block's 16-entry table: two codes
//! per byte, the even element in the high nibble.
//!
//! A table lookup per code compiles to a gather when vectorized, and gathers
//! are microcoded and slow on current Intel parts (the Gather Data Sampling
//! mitigation), so the AVX-512 path holds the table in one register and
//! looks codes up with `vpermd`, 32 codes per step. Other paths look up one
//! code at a time. Both give the same values: only table entries are copied.

use super::NF4_CODE;
use crate::bf16_bits;
use crate::simd::has_avx512;

/// What packed codes decode to: f32 values, or bf16 ones as bits.
pub(super) trait Decoded: Copy {
    /// The 16 values of a block of absmax `a`: `code·a`.
    fn table(a: f32) -> [Self; 16];
    /// Decodes whole steps of 16 bytes with AVX-512; returns how many
    /// bytes it did.
    ///
    /// # Safety
    /// The CPU has avx512f.
    #[cfg(target_arch = "x86_64")]
    unsafe fn avx512(a: f32, bytes: &[u8], out: &mut [Self]) -> usize;
}

impl Decoded for f32 {
    #[inline(always)]
    fn table(a: f32) -> [f32; 16] {
        NF4_CODE.map(|c| c * a)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512(a: f32, bytes: &[u8], out: &mut [f32]) -> usize {
        x86::f32s(a, bytes, out)
    }
}

impl Decoded for u16 {
    #[inline(always)]
    fn table(a: f32) -> [u16; 16] {
        NF4_CODE.map(|c| bf16_bits(c * a))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn avx512(a: f32, bytes: &[u8], out: &mut [u16]) -> usize {
        x86::bf16s(a, bytes, out)
    }
}

/// `out[2i]`, `out[2i+1]` = the values of the high and low code of
/// `bytes[i]` in a block of absmax `a`.
#[inline(always)]
pub(super) fn decode<V: Decoded>(a: f32, bytes: &[u8], out: &mut [V]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the AVX-512 paths are only active on CPUs with avx512f.
        done = unsafe { V::avx512(a, bytes, out) };
    }
    if done < bytes.len() {
        scalar(&V::table(a), &bytes[done..], &mut out[2 * done..]);
    }
}

/// One lookup per code. Never inlined, so it stays compiled for baseline
/// x86-64 (no gathers) even when called from a wider-vector caller.
#[inline(never)]
pub(super) fn scalar<V: Copy>(t: &[V; 16], bytes: &[u8], out: &mut [V]) {
    for (d, &byte) in out.chunks_exact_mut(2).zip(bytes) {
        d[0] = t[(byte >> 4) as usize];
        d[1] = t[(byte & 0xF) as usize];
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::NF4_CODE;
    use std::arch::x86_64::*;

    /// `code·a` for the 16 codes, as f32 lanes.
    #[inline(always)]
    unsafe fn values(a: f32) -> __m512 {
        _mm512_mul_ps(_mm512_loadu_ps(NF4_CODE.as_ptr()), _mm512_set1_ps(a))
    }

    /// [`crate::bf16_bits`] on 16 lanes: to nearest, ties to even; a NaN
    /// becomes a quiet NaN. The bf16 bits in the low half of each lane.
    #[inline(always)]
    unsafe fn bf16_bits(x: __m512) -> __m512i {
        let b = _mm512_castps_si512(x);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
        let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
        let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
        let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        _mm512_mask_blend_epi32(nan, rounded, quiet)
    }

    /// The high and low codes of 16 bytes, looked up: 16 even elements and
    /// 16 odd ones, each in 32-bit lanes.
    #[inline(always)]
    unsafe fn lookup(tbl: __m512i, bytes: *const u8) -> (__m512i, __m512i) {
        let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.cast()));
        let hi = _mm512_srli_epi32::<4>(b);
        let lo = _mm512_and_si512(b, _mm512_set1_epi32(0xF));
        (
            _mm512_permutexvar_epi32(hi, tbl),
            _mm512_permutexvar_epi32(lo, tbl),
        )
    }

    /// Decodes whole steps of 16 bytes; returns how many bytes it did.
    ///
    /// # Safety
    /// The CPU has avx512f; `out` holds at least `2·bytes.len()` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bf16s(a: f32, bytes: &[u8], out: &mut [u16]) -> usize {
        assert!(out.len() >= 2 * bytes.len());
        let tbl = bf16_bits(values(a));
        let done = bytes.len() / 16 * 16;
        for i in (0..done).step_by(16) {
            let (even, odd) = lookup(tbl, bytes.as_ptr().add(i));
            // A bf16 pair in memory order is `even | odd << 16`.
            let pairs = _mm512_or_si512(even, _mm512_slli_epi32::<16>(odd));
            _mm512_storeu_si512(out.as_mut_ptr().add(2 * i).cast(), pairs);
        }
        done
    }

    /// As [`bf16s`], for f32 values.
    ///
    /// # Safety
    /// As [`bf16s`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn f32s(a: f32, bytes: &[u8], out: &mut [f32]) -> usize {
        assert!(out.len() >= 2 * bytes.len());
        let tbl = _mm512_castps_si512(values(a));
        // Interleave even and odd: lanes 0..8 of each, then 8..16.
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
        let done = bytes.len() / 16 * 16;
        for i in (0..done).step_by(16) {
            let (even, odd) = lookup(tbl, bytes.as_ptr().add(i));
            let o = out.as_mut_ptr().add(2 * i).cast::<__m512i>();
            _mm512_storeu_si512(o, _mm512_permutex2var_epi32(even, first, odd));
            _mm512_storeu_si512(o.add(1), _mm512_permutex2var_epi32(even, second, odd));
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic byte stream and absmax values (every code and nibble
    /// order; absmax values whose products hit bf16 ties, and a NaN).
    fn case(n: usize, seed: u32) -> (Vec<u8>, Vec<f32>) {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        let bytes = (0..n).map(|_| next() as u8).collect();
        let mut absmax: Vec<f32> = (0..8).map(|_| f32::from_bits(next() >> 2)).collect();
        absmax.extend([1.0, 0.0, 3.0e38, f32::NAN, 1.0 + 2f32.powi(-8)]);
        (bytes, absmax)
    }

    /// The AVX-512 decoders (table built in registers, `vpermd` lookups)
    /// against the table and one lookup per code, on ragged lengths.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_decoders_match_the_lookup() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for n in [0, 1, 15, 16, 17, 31, 32, 33, 100, 257] {
            let (bytes, absmax) = case(n, n as u32 + 1);
            for a in absmax {
                let mut want = vec![0f32; 2 * n];
                scalar(&f32::table(a), &bytes, &mut want);
                let mut got = vec![f32::NAN; 2 * n];
                let done = unsafe { x86::f32s(a, &bytes, &mut got) };
                assert_eq!(done, n / 16 * 16);
                scalar(&f32::table(a), &bytes[done..], &mut got[2 * done..]);
                // A NaN's sign is unspecified in Rust: NaN-ness is compared.
                let bits = |v: &[f32]| {
                    let nan = |x: &f32| if x.is_nan() { f32::NAN } else { *x };
                    v.iter().map(|x| nan(x).to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(bits(&got), bits(&want), "f32, {n} bytes, absmax {a}");

                let mut want = vec![0u16; 2 * n];
                scalar(&u16::table(a), &bytes, &mut want);
                let mut got = vec![0xFFFFu16; 2 * n];
                let done = unsafe { x86::bf16s(a, &bytes, &mut got) };
                scalar(&u16::table(a), &bytes[done..], &mut got[2 * done..]);
                let nan = |v: Vec<u16>| {
                    v.into_iter()
                        .map(|x| if x & 0x7FFF > 0x7F80 { 0x7FC0 } else { x })
                };
                assert!(nan(got).eq(nan(want)), "bf16, {n} bytes, absmax {a}");
            }
        }
    }
}
