//! Packed NF4 codes to values through a block's 16-entry table: two codes
//! per byte, the even element in the high nibble.
//!
//! A table lookup per code compiles to a gather when vectorized, and gathers
//! are microcoded and slow on current Intel parts (the Gather Data Sampling
//! mitigation), so the AVX-512 path holds the table in one register and
//! looks codes up with `vpermd`, 32 codes per step. Other paths look up one
//! code at a time. Both give the same values: only table entries are copied.

use crate::gemm::Path;

/// `out[2i]`, `out[2i+1]` = `t[hi(bytes[i])]`, `t[lo(bytes[i])]`.
#[inline(always)]
pub(super) fn decode_f32(t: &[f32; 16], bytes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the AVX-512 paths are only active on CPUs with avx512f.
        let done = unsafe { avx512::f32s(t, bytes, out) };
        return scalar(t, &bytes[done..], &mut out[2 * done..]);
    }
    scalar(t, bytes, out)
}

/// The same for bf16 values (as bits).
#[inline(always)]
pub(super) fn decode_bf16(t: &[u16; 16], bytes: &[u8], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: as above.
        let done = unsafe { avx512::bf16s(t, bytes, out) };
        return scalar(t, &bytes[done..], &mut out[2 * done..]);
    }
    scalar(t, bytes, out)
}

#[inline(always)]
fn has_avx512() -> bool {
    matches!(Path::active(), Path::Avx512 | Path::Avx512Bf16 | Path::Amx)
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
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    /// The table's entries as 32-bit lanes of one register.
    #[inline(always)]
    unsafe fn table(w: [u32; 16]) -> __m512i {
        _mm512_loadu_si512(w.as_ptr().cast())
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
    pub unsafe fn bf16s(t: &[u16; 16], bytes: &[u8], out: &mut [u16]) -> usize {
        assert!(out.len() >= 2 * bytes.len());
        let tbl = table(t.map(u32::from));
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
    pub unsafe fn f32s(t: &[f32; 16], bytes: &[u8], out: &mut [f32]) -> usize {
        assert!(out.len() >= 2 * bytes.len());
        let tbl = table(t.map(f32::to_bits));
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

    /// A deterministic byte stream and table (every code and nibble order).
    fn case(n: usize, seed: u32) -> (Vec<u8>, [f32; 16]) {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        };
        let bytes = (0..n).map(|_| next() as u8).collect();
        let t = std::array::from_fn(|_| f32::from_bits(next() >> 2));
        (bytes, t)
    }

    /// The AVX-512 decoders against one lookup per code, on ragged lengths.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_decoders_match_the_lookup() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for n in [0, 1, 15, 16, 17, 31, 32, 33, 100, 257] {
            let (bytes, t) = case(n, n as u32 + 1);
            let mut want = vec![0f32; 2 * n];
            scalar(&t, &bytes, &mut want);
            let mut got = vec![f32::NAN; 2 * n];
            let done = unsafe { avx512::f32s(&t, &bytes, &mut got) };
            assert_eq!(done, n / 16 * 16);
            scalar(&t, &bytes[done..], &mut got[2 * done..]);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "f32, {n} bytes");

            let t16 = t.map(|v| (v.to_bits() >> 16) as u16);
            let mut want = vec![0u16; 2 * n];
            scalar(&t16, &bytes, &mut want);
            let mut got = vec![0xFFFFu16; 2 * n];
            let done = unsafe { avx512::bf16s(&t16, &bytes, &mut got) };
            scalar(&t16, &bytes[done..], &mut got[2 * done..]);
            assert_eq!(got, want, "bf16, {n} bytes");
        }
    }
}
