//! The operands as packing sees them, and the packing itself: a block of
//! `op(a)` or `op(b)` copied into the panel layout the micro-kernels read,
//! whatever the transpose flags and storage type (dense f32/bf16/f16, or
//! NF4 dequantized on the way), with zero padding past the matrix edge so
//! that every micro-kernel call sees a full tile.
//!
//! Two panel element types: f32 for the FMA kernels, and [`Pair`] (two bf16
//! of consecutive k) for the bf16 dot-product kernel. Panels are step-major
//! (a step is one k for f32, two for pairs): a B panel holds
//! `dst[s·nr + j] = op(b)[p0 + s·K.., j0 + j]`, and an A panel is the same
//! layout for `op(a)ᵀ` with mr columns, so one routine packs both.

use super::Operand;
use crate::simd::vectorized;
use crate::{bf16_bits, Elem};

/// An element of a packed panel.
///
/// # Safety
/// Four bytes, 4-byte aligned, every bit pattern valid: the driver keeps
/// its panels in `u32` buffers and views them as `Self`.
pub(super) unsafe trait Packed: Copy + Default + Send + Sync + 'static {
    /// How many consecutive k one element holds (1 or 2).
    const K: usize;
    /// What an element is made of: f32 values, or bf16 bits.
    type Val: Copy + Default;
    /// Stored row `r`, columns `c0..c0 + out.len()` of `src`.
    fn read(src: &impl Source, r: usize, c0: usize, out: &mut [Self::Val]);
    /// The element of `v[..K]`.
    fn pack(v: [Self::Val; 2]) -> Self;
}

// SAFETY: f32 is 4 bytes with every bit pattern valid.
unsafe impl Packed for f32 {
    const K: usize = 1;
    type Val = f32;
    #[inline(always)]
    fn read(src: &impl Source, r: usize, c0: usize, out: &mut [f32]) {
        src.row_f32(r, c0, out)
    }
    #[inline(always)]
    fn pack(v: [f32; 2]) -> Self {
        v[0]
    }
}

/// Two bf16 of consecutive k, the lower k in the low half: the operand
/// layout of `vdpbf16ps` and of AMX's `tdpbf16ps`, which multiply pairs and
/// add both products.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(transparent)]
pub(super) struct Pair(pub u32);

// SAFETY: a transparent u32.
unsafe impl Packed for Pair {
    const K: usize = 2;
    type Val = u16;
    #[inline(always)]
    fn read(src: &impl Source, r: usize, c0: usize, out: &mut [u16]) {
        src.row_bf16(r, c0, out)
    }
    #[inline(always)]
    fn pack(v: [u16; 2]) -> Self {
        Pair(v[0] as u32 | (v[1] as u32) << 16)
    }
}

/// A stored matrix, read a run of one stored row at a time.
pub(super) trait Source: Sync {
    /// Stored row `r`, columns `c0..c0 + out.len()`, as f32 (rounded to
    /// bf16 first when the operand is multiplied in bf16).
    fn row_f32(&self, r: usize, c0: usize, out: &mut [f32]);
    /// The same run as bf16 bits (operands packed for bf16 kernels).
    fn row_bf16(&self, r: usize, c0: usize, out: &mut [u16]);
}

/// An [`Operand`] as packing reads it: its stored rows (`ld` elements
/// apart; an NF4 weight dequantized as it is read), multiplied by `scale`,
/// then rounded to bf16 when `round` (the product is taken in bf16).
pub(super) struct Stored<'a> {
    pub op: Operand<'a>,
    pub ld: usize,
    pub scale: f32,
    pub round: bool,
}

impl Stored<'_> {
    /// The values as read, unscaled and unrounded.
    #[inline(always)]
    fn raw_f32(&self, r: usize, c0: usize, out: &mut [f32]) {
        let at = r * self.ld + c0;
        match self.op {
            Operand::F32(d) => out.copy_from_slice(&d[at..][..out.len()]),
            Operand::Bf16(d) => widen(&d[at..][..out.len()], out),
            Operand::F16(d) => widen(&d[at..][..out.len()], out),
            Operand::Nf4(w) => w.dequantize_into(at, out),
        }
    }
}

#[inline(always)]
fn widen<T: Elem>(src: &[T], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = v.to_f32();
    }
}

impl Source for Stored<'_> {
    #[inline(always)]
    fn row_f32(&self, r: usize, c0: usize, out: &mut [f32]) {
        self.raw_f32(r, c0, out);
        if self.scale != 1.0 {
            out.iter_mut().for_each(|o| *o *= self.scale);
        }
        // bf16 storage is exact in bf16 unless scaled.
        let exact = matches!(self.op, Operand::Bf16(_)) && self.scale == 1.0;
        if self.round && !exact {
            for o in out.iter_mut() {
                *o = f32::from_bits((bf16_bits(*o) as u32) << 16);
            }
        }
    }
    #[inline(always)]
    fn row_bf16(&self, r: usize, c0: usize, out: &mut [u16]) {
        let at = r * self.ld + c0;
        match self.op {
            Operand::Bf16(d) if self.scale == 1.0 => {
                let len = out.len();
                for (o, v) in out.iter_mut().zip(&d[at..][..len]) {
                    *o = v.to_bits();
                }
            }
            Operand::Nf4(w) if self.scale == 1.0 => w.dequantize_bf16_into(at, out),
            _ => {
                // Through f32 (scaled), a run at a time.
                let mut buf = [0f32; 128];
                for (i, o) in out.chunks_mut(buf.len()).enumerate() {
                    let b = &mut buf[..o.len()];
                    self.raw_f32(r, c0 + i * 128, b);
                    for (d, &v) in o.iter_mut().zip(b.iter()) {
                        *d = bf16_bits(v * self.scale);
                    }
                }
            }
        }
    }
}

/// A matrix `M` (`[k, n]`) as a stored matrix: `M` itself (row p stored as
/// row p) or, when `trans`, its transpose (column j stored as row j).
pub(super) struct View<'a, S> {
    pub src: &'a S,
    pub trans: bool,
}

/// Columns read per stored row at a time, and k per transposed block: small
/// enough that the buffers and the destination block being filled stay in L1.
const RUN: usize = 128;

impl<S: Source> View<'_, S> {
    /// Packs k `p0..p0+kc` and columns `j0..j0+cols` of `M` into `dst` as
    /// panels of nr columns, `steps·nr` elements each (`steps` at least
    /// `kc.div_ceil(K)`): `dst[q·steps·nr + s·nr + j]` holds
    /// `M[p0+s·K.., j0+q·nr+j]`, zero past `cols` and past `kc`.
    pub fn pack<E: Packed>(
        &self,
        dst: &mut [E],
        k: (usize, usize),
        j: (usize, usize),
        nr: usize,
        steps: usize,
    ) {
        // Widening, rounding to bf16 and pairing vectorize at full width.
        vectorized(
            #[inline(always)]
            || self.pack_here(dst, k, j, nr, steps),
        )
    }

    #[inline(always)]
    fn pack_here<E: Packed>(
        &self,
        dst: &mut [E],
        (p0, kc): (usize, usize),
        (j0, cols): (usize, usize),
        nr: usize,
        steps: usize,
    ) {
        let used = kc.div_ceil(E::K);
        debug_assert!(steps >= used);
        let panel = steps * nr;
        debug_assert_eq!(dst.len(), cols.div_ceil(nr) * panel);
        for d in dst.chunks_exact_mut(panel) {
            d[used * nr..].fill(E::default());
        }
        let zero = E::Val::default();
        if self.trans {
            // Stored row j is column j of M: each run of it fills one
            // column of a panel, a step every nr elements. A block of RUN k
            // at a time keeps the destination block in L1.
            let mut buf = [zero; RUN + 1];
            for (q, d) in dst.chunks_exact_mut(panel).enumerate() {
                let cols_q = nr.min(cols - q * nr);
                for pb in (0..kc).step_by(RUN) {
                    let len = RUN.min(kc - pb);
                    let n_steps = len.div_ceil(E::K);
                    let block = &mut d[pb / E::K * nr..][..n_steps * nr];
                    for j in 0..cols_q {
                        E::read(self.src, j0 + q * nr + j, p0 + pb, &mut buf[..len]);
                        buf[len] = zero; // the pair partner past an odd end
                        let vals = buf[..n_steps * E::K].chunks_exact(E::K);
                        for (o, v) in block[j..].iter_mut().step_by(nr).zip(vals) {
                            *o = E::pack([v[0], v[E::K - 1]]);
                        }
                    }
                    if cols_q < nr {
                        for o in block.chunks_exact_mut(nr) {
                            o[cols_q..].fill(E::default());
                        }
                    }
                }
            }
        } else {
            // Stored rows are rows of M: K of them make a step, read in
            // runs of RUN columns and scattered to the panels.
            let mut bufs = [[zero; RUN]; 2];
            for s in 0..used {
                let p = s * E::K;
                let valid = E::K.min(kc - p);
                for c0 in (0..cols).step_by(RUN) {
                    let len = RUN.min(cols - c0);
                    for (u, b) in bufs.iter_mut().enumerate().take(E::K) {
                        if u < valid {
                            E::read(self.src, p0 + p + u, j0 + c0, &mut b[..len]);
                        } else {
                            b[..len].fill(zero);
                        }
                    }
                    // Runs of columns within one panel: contiguous there.
                    let mut c = 0;
                    while c < len {
                        let (q, j) = ((c0 + c) / nr, (c0 + c) % nr);
                        let w = (nr - j).min(len - c);
                        let out = &mut dst[q * panel + s * nr + j..][..w];
                        let (lo, hi) = (&bufs[0][c..c + w], &bufs[E::K - 1][c..c + w]);
                        for ((o, &l), &h) in out.iter_mut().zip(lo).zip(hi) {
                            *o = E::pack([l, h]);
                        }
                        c += w;
                    }
                }
                let tail = cols % nr;
                if tail > 0 {
                    let last = &mut dst[(cols / nr) * panel + s * nr..][..nr];
                    last[tail..].fill(E::default());
                }
            }
        }
    }
}
