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

use super::transpose::{scatter, GROUP};
use super::Operand;
use crate::simd::vectorized;
use crate::{bf16_bits, Elem};

/// An element of a packed panel.
///
/// # Safety
/// Four bytes, 4-byte aligned, every bit pattern valid: the driver keeps
/// its panels in `u32` buffers and views them as `Self`. `Val` is f32 with
/// `K` one, or u16 with `K` two, and `pack` puts `v[0]` in the low bits:
/// packing views a buffer of words as values.
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

/// A panel's elements as 32-bit words.
fn words<E: Packed>(d: &mut [E]) -> &mut [u32] {
    // SAFETY: `Packed` types are 4 bytes, 4-aligned, any bit pattern valid.
    unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr().cast(), d.len()) }
}

/// [`words`] for reading.
fn words_of<E: Packed>(d: &[E]) -> &[u32] {
    // SAFETY: as for `words`.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast(), d.len()) }
}

/// Words as the values packing reads into, `K` to a word in order: the
/// words are then the packed elements (a [`Pair`] is its low k in the low
/// half, as a little-endian `u16` pair lies in memory).
fn vals<E: Packed>(w: &mut [u32]) -> &mut [E::Val] {
    let n = w.len() * 4 / std::mem::size_of::<E::Val>();
    // SAFETY: `Val` is f32 or u16 (see `Packed`): any bit pattern valid,
    // alignment at most 4, and `n` of them fill the words exactly.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr().cast(), n) }
}

/// A stored matrix, read a run of one stored row at a time.
pub(super) trait Source: Sync {
    /// Stored row `r`, columns `c0..c0 + out.len()`, as f32 (rounded to
    /// bf16 first when the operand is multiplied in bf16).
    fn row_f32(&self, r: usize, c0: usize, out: &mut [f32]);
    /// The same run as bf16 bits (operands packed for bf16 kernels).
    fn row_bf16(&self, r: usize, c0: usize, out: &mut [u16]);
    /// Asks for stored row `r`, columns `c0..c0 + len`, to be brought into
    /// cache: packing reads many short runs of rows far apart, too short
    /// for the hardware prefetcher to follow, so it names the next ones.
    fn prefetch(&self, r: usize, c0: usize, len: usize);
    /// The stored rows as they lie in memory, `ld` elements apart, when
    /// they are bf16 that packing would only copy (no scale): AMX loads its
    /// A tiles straight from them.
    fn bf16_rows(&self) -> Option<(&[crate::bf16], usize)>;
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

/// Elements `at..at + len` of `d` (clipped to it) as bytes.
#[inline(always)]
fn bytes_of<T>(d: &[T], at: usize, len: usize) -> &[u8] {
    let s = at.min(d.len());
    let d = &d[s..(at + len).min(d.len())];
    // SAFETY: f32/bf16/f16 slices: plain bytes, no padding.
    unsafe { std::slice::from_raw_parts(d.as_ptr().cast(), std::mem::size_of_val(d)) }
}

#[inline(always)]
fn widen<T: Elem>(src: &[T], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(src) {
        *o = v.to_f32();
    }
}

impl Source for Stored<'_> {
    fn bf16_rows(&self) -> Option<(&[crate::bf16], usize)> {
        match self.op {
            Operand::Bf16(d) if self.scale == 1.0 => Some((d, self.ld)),
            _ => None,
        }
    }
    #[inline(always)]
    fn prefetch(&self, r: usize, c0: usize, len: usize) {
        let at = r * self.ld + c0;
        let bytes: &[u8] = match self.op {
            Operand::F32(d) => bytes_of(d, at, len),
            Operand::Bf16(d) => bytes_of(d, at, len),
            Operand::F16(d) => bytes_of(d, at, len),
            Operand::Nf4(w) => {
                let (s, e) = ((at / 2).min(w.packed.len()), (at + len).div_ceil(2));
                &w.packed[s..e.min(w.packed.len())]
            }
        };
        for line in bytes.chunks(64) {
            // SAFETY: a prefetch only hints; the address is in the slice.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    line.as_ptr().cast(),
                )
            };
        }
    }

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

    /// Packs k `p0..p0+kc` and columns `j0..j0+cols` of `M` into `dst` as
    /// panels of `mr` columns (`dst.len() / cols.div_ceil(mr)` elements
    /// each) in blocks of `w` steps, each block column by column:
    /// `dst[q·panel + b·mr·w + j·w + s]` holds `M[p0 + (b·w + s)·K..,
    /// j0 + q·mr + j]`, zero past `cols` and past `kc` (AMX's A tiles: a
    /// block's columns are the rows of a tile, 64 bytes each).
    pub fn pack_tiled<E: Packed>(
        &self,
        dst: &mut [E],
        k: (usize, usize),
        j: (usize, usize),
        mr: usize,
        w: usize,
    ) {
        vectorized(
            #[inline(always)]
            || self.pack_tiled_here(dst, k, j, mr, w),
        )
    }

    /// The `K` stored rows from `row` that make one step, columns `c0..c0 +
    /// len`, into `bufs` (zeros for the rows from `valid` on, past `kc`),
    /// the next step's rows asked for.
    #[inline(always)]
    fn read_step<E: Packed>(
        &self,
        bufs: &mut [[E::Val; RUN]; 2],
        row: usize,
        valid: usize,
        (c0, len): (usize, usize),
    ) {
        for (u, b) in bufs.iter_mut().enumerate().take(E::K) {
            if u < valid {
                E::read(self.src, row + u, c0, &mut b[..len]);
                self.src.prefetch(row + u + E::K, c0, len);
            } else {
                b[..len].fill(E::Val::default());
            }
        }
    }

    #[inline(always)]
    fn pack_tiled_here<E: Packed>(
        &self,
        dst: &mut [E],
        (p0, kc): (usize, usize),
        (j0, cols): (usize, usize),
        mr: usize,
        w: usize,
    ) {
        let used = kc.div_ceil(E::K);
        let (block, panels) = (mr * w, cols.div_ceil(mr));
        let panel = dst.len() / panels.max(1);
        debug_assert!(panel.is_multiple_of(block) && panel / mr >= used);
        for (q, d) in dst.chunks_exact_mut(panel).enumerate() {
            let cols_q = mr.min(cols - q * mr);
            for (b, blk) in d.chunks_exact_mut(block).enumerate() {
                let live = used.saturating_sub(b * w).min(w);
                for (j, col) in blk.chunks_exact_mut(w).enumerate() {
                    col[if j < cols_q { live } else { 0 }..].fill(E::default());
                }
            }
        }
        let zero = E::Val::default();
        if self.trans {
            // Stored row j is column j of M: read SPAN of it at a time (one
            // call per block of `w` steps costs more than the copy), then
            // copied a block's part at a time into place.
            const SPAN: usize = 4 * RUN;
            let run = w * E::K;
            debug_assert!(SPAN.is_multiple_of(run));
            let mut buf = [zero; SPAN];
            for j in 0..cols {
                let (row, at) = (j0 + j, (j / mr) * panel + (j % mr) * w);
                self.src.prefetch(row + 1, p0, kc);
                for k0 in (0..kc).step_by(SPAN) {
                    let len = SPAN.min(kc - k0);
                    E::read(self.src, row, p0 + k0, &mut buf[..len]);
                    for (i, part) in buf[..len].chunks(run).enumerate() {
                        let b = k0 / run + i;
                        let vals = vals::<E>(words(&mut dst[at + b * block..][..w]));
                        vals[..part.len()].copy_from_slice(part);
                        if part.len() % E::K != 0 {
                            vals[part.len()] = zero; // the pair partner past an odd end
                        }
                    }
                }
            }
        } else {
            // Stored rows are rows of M: K of them make a step, a run of
            // columns across panels. A block's steps, packed side by side,
            // are transposed into each panel (a column's steps contiguous).
            debug_assert!(w <= GROUP && RUN.is_multiple_of(mr));
            let mut bufs = [[zero; RUN]; 2];
            let mut packed = [[E::default(); RUN]; GROUP];
            for (b, s0) in (0..used).step_by(w).enumerate() {
                let live = w.min(used - s0);
                for c0 in (0..cols).step_by(RUN) {
                    let len = RUN.min(cols - c0);
                    for (i, run) in packed.iter_mut().enumerate().take(live) {
                        let p = (s0 + i) * E::K;
                        let valid = E::K.min(kc - p);
                        self.read_step::<E>(&mut bufs, p0 + p, valid, (j0 + c0, len));
                        let (lo, hi) = (&bufs[0][..len], &bufs[E::K - 1][..len]);
                        for ((o, &l), &h) in run.iter_mut().zip(lo).zip(hi) {
                            *o = E::pack([l, h]);
                        }
                    }
                    for q0 in (0..len).step_by(mr) {
                        let (q, n) = ((c0 + q0) / mr, mr.min(len - q0));
                        let runs: [&[u32]; GROUP] =
                            std::array::from_fn(|i| words_of(&packed[i][q0..q0 + n]));
                        let out = words(&mut dst[q * panel + b * block..][..block]);
                        scatter(&runs[..live], n, out, w);
                    }
                }
            }
        }
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
            // Stored row j is column j of M: a run of it is one column of a
            // panel, an element per step, read for 16 columns at a time and
            // transposed into the panel. A block of RUN k at a time keeps
            // the destination block in L1.
            let mut bufs = [[0u32; RUN + 1]; GROUP];
            for (q, d) in dst.chunks_exact_mut(panel).enumerate() {
                let cols_q = nr.min(cols - q * nr);
                for pb in (0..kc).step_by(RUN) {
                    let len = RUN.min(kc - pb);
                    let n_steps = len.div_ceil(E::K);
                    let block = words(&mut d[pb / E::K * nr..][..n_steps * nr]);
                    for c0 in (0..cols_q).step_by(GROUP) {
                        let g = GROUP.min(cols_q - c0);
                        for (c, b) in bufs.iter_mut().enumerate().take(g) {
                            // A run's values, K to an element: the buffer's
                            // words are the packed elements.
                            let (row, vals) = (j0 + q * nr + c0 + c, vals::<E>(b));
                            E::read(self.src, row, p0 + pb, &mut vals[..len]);
                            self.src.prefetch(row, p0 + pb + RUN, RUN);
                            vals[len] = zero; // the pair partner past an odd end
                        }
                        let rows: [&[u32]; GROUP] = std::array::from_fn(|c| &bufs[c][..]);
                        scatter(&rows[..g], n_steps, &mut block[c0..], nr);
                    }
                    if cols_q < nr {
                        for o in block.chunks_exact_mut(nr) {
                            o[cols_q..].fill(0);
                        }
                    }
                }
            }
        } else {
            // Stored rows are rows of M: K of them make a step, read in
            // runs of RUN columns, packed whole (a loop the compiler
            // vectorizes), then copied to the panels a panel's part at a time.
            let mut bufs = [[zero; RUN]; 2];
            let mut packed = [E::default(); RUN];
            for s in 0..used {
                let p = s * E::K;
                let valid = E::K.min(kc - p);
                for c0 in (0..cols).step_by(RUN) {
                    let len = RUN.min(cols - c0);
                    self.read_step::<E>(&mut bufs, p0 + p, valid, (j0 + c0, len));
                    let (lo, hi) = (&bufs[0][..len], &bufs[E::K - 1][..len]);
                    for ((o, &l), &h) in packed.iter_mut().zip(lo).zip(hi) {
                        *o = E::pack([l, h]);
                    }
                    // Runs of columns within one panel: contiguous there.
                    let mut c = 0;
                    while c < len {
                        let (q, j) = ((c0 + c) / nr, (c0 + c) % nr);
                        let w = (nr - j).min(len - c);
                        dst[q * panel + s * nr + j..][..w].copy_from_slice(&packed[c..c + w]);
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
