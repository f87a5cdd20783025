//! The blocked driver shared by the SIMD paths: loops over m (MC rows of
//! `op(a)`), n (super-slabs of columns), k (KC of the packed panels) and n
//! again (slabs of NC columns), packing as it goes, and the split of the
//! work over threads.
//!
//! Loop order, innermost last: m blocks → super-slabs of columns → k blocks
//! (A block packed once, shared by all threads) → one rayon task per part of
//! the super-slab → slabs of its columns (B slab packed by the task, kept in
//! its core's L2) → A panels (one MR×KC panel stays in L1) → B panels →
//! micro-kernel. Each output element's terms are summed in order p = 0, 1,
//! …, k−1 (the tile is loaded back for every k block after the first): how
//! m and n are split, and over how many threads, never changes a result.
//!
//! The micro-kernels accumulate in f32. An f32 output is accumulated in
//! place; any other is accumulated in an f32 buffer one (m block,
//! super-slab) at a time and rounded once at the end, which bounds the
//! buffer at MC×NS floats whatever the shape.

use super::operand::{Packed, Source, View};
use super::Epilogue;
use crate::Elem;
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;
use std::thread::LocalKey;

/// A micro-kernel: `c[i,j] (+)= Σ_s a[s·mr + i]·b[s·nr + j]` over an mr×nr
/// tile of `c` with row stride `ldc`, for `steps` packed elements (each one
/// k, or a pair of k summed by the instruction), adding to what `c` holds
/// when `accumulate`, else overwriting it without reading it.
///
/// # Safety
/// The CPU has the kernel's target features; `a` and `b` are readable for
/// `steps·mr` and `steps·nr` elements; the tile at `c` (mr rows of nr
/// floats, `ldc` apart) is writable, and readable when `accumulate`.
pub(super) type Kernel<E> =
    unsafe fn(steps: usize, a: *const E, b: *const E, c: *mut f32, ldc: usize, accumulate: bool);

/// A micro-kernel that reads A straight from `mr` stored rows of bf16,
/// `lda` elements apart, k contiguous in each: [`Kernel`]'s sum with
/// `a[s·mr + i]` the pair of `a[i·lda + 2s..]`.
///
/// # Safety
/// As [`Kernel`], with the `mr` rows of `2·steps` elements at `a` readable.
pub(super) type RowsKernel<E> = unsafe fn(
    steps: usize,
    a: *const u16,
    lda: usize,
    b: *const E,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
);

/// A micro-kernel with its tile and the cache blocking chosen for it.
pub(super) struct Micro<E> {
    /// Rows of the register tile (broadcasts of `op(a)`).
    pub mr: usize,
    /// Columns of the register tile (vectors of `op(b)`).
    pub nr: usize,
    /// k per packed panel (a multiple of the element's K): an mr×kc A
    /// panel lives in L1.
    pub kc: usize,
    /// Rows of `op(a)` packed at once (a multiple of mr); bounds the A
    /// buffer, which the driver lets run a quarter over to keep m blocks equal.
    pub mc: usize,
    /// Columns of a packed B slab (a multiple of nr): kc×nc lives in L2.
    pub nc: usize,
    /// Steps per panel rounded up to a multiple of this (zero padded): the
    /// depth of a tile multiply for AMX, else 1.
    pub step_align: usize,
    /// A panels stored as blocks of `step_align` steps, each block row by
    /// row (`a[(s / align)·mr·align + i·align + s % align]`: an AMX tile's
    /// rows, contiguous) instead of step-major (`a[s·mr + i]`, for broadcasts).
    pub a_tiled: bool,
    /// Only ever called once the CPU is known to have its features.
    pub kernel: Kernel<E>,
    /// Reads A in place where its rows are stored bf16 that packing would
    /// only copy (AMX: a tile load takes any row stride), so a product
    /// with few columns, LoRA's `x·Aᵀ`, is not a pass over `x` to pack it.
    pub rows_kernel: Option<RowsKernel<E>>,
    /// Bytes the rows read in place, and their stride, are aligned to (a
    /// 64-byte AMX tile row across two cache lines loads at half speed; the
    /// broadcasts of AVX512-BF16 read aligned pairs).
    pub rows_align: usize,
    /// The most of the mr rows read in place that may share an L1 set
    /// (rows a multiple of 4 KiB apart do; stored rows of 2048 or 4096
    /// bf16 would put every row in one set and thrash it): above it, A is
    /// packed, unless one B panel is all that reads it.
    pub rows_per_set: usize,
    /// Run by each task before its first kernel call, on the task's thread
    /// (AMX loads its tile configuration here: `ldtilecfg` costs as much as
    /// a quarter of a 32×32×512 kernel call).
    pub setup: Option<unsafe fn()>,
}

impl<E: Packed> Micro<E> {
    /// Packed steps per panel for a k block of `kc`.
    fn steps(&self, kc: usize) -> usize {
        kc.div_ceil(E::K).next_multiple_of(self.step_align)
    }
}

/// Columns of `op(a)ᵀ` per packing call when a stored row holds a run of
/// them (AMX's tiled panels always, else when `op(a)ᵀ` is stored as is):
/// one panel's 12, 14 or 32 columns are too short a run to read well.
const PACK_COLS: usize = 128;

/// The largest register tile (AMX's 32×32 of four tiles): ragged edge
/// tiles go through a buffer of this size on the stack.
const MAX_TILE: usize = 32 * 32;

/// B slabs per super-slab: the columns whose f32 accumulators a non-f32
/// output keeps at once (with an m block of up to 1.25·mc rows:
/// 1260×2560×4 B ≈ 13 MB for AVX-512).
const SLABS_PER_SUPER: usize = 4;

/// Below this many multiply-adds (m·k·n: ~15 µs on one core here) one
/// thread does the whole product: waking the pool and the two joins per
/// (k block, m block) cost microseconds each.
const PAR_MIN_WORK: usize = 1 << 20;

thread_local! {
    /// Packed A blocks, B slabs and f32 accumulators, kept per thread
    /// between calls so that a training step's many matmuls do not allocate
    /// (and fault in) fresh megabytes each time.
    static A_BUF: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
    static C_BUF: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a 64-byte-aligned slice of `len` elements from `key`'s
/// buffer. The buffer is taken out while in use, so a nested call on the
/// same thread (rayon may run another task while this one waits) gets its own.
fn with_buf<E: Packed, R>(
    key: &'static LocalKey<Cell<Vec<u32>>>,
    len: usize,
    f: impl FnOnce(&mut [E]) -> R,
) -> R {
    const PAD: usize = 64 / size_of::<u32>();
    let mut v = key.take();
    if v.len() < len + PAD {
        v.resize(len + PAD, 0);
    }
    // Aligned panels keep every vector load of a packed row in one cache line.
    let off = v.as_ptr().align_offset(64);
    assert!(off < PAD, "u32 pointers are 4-byte aligned");
    let words = &mut v[off..off + len];
    // SAFETY: `Packed` types are 4 bytes, 4-byte aligned, with every bit
    // pattern valid, like the u32s they are viewed from.
    let elems = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<E>(), len) };
    let r = f(elems);
    key.set(v);
    r
}

/// The f32 accumulators: rows `ldc` apart, shared by the tasks that write
/// disjoint tiles of them.
#[derive(Clone, Copy)]
struct SharedC {
    ptr: *mut f32,
    ldc: usize,
}

// SAFETY: the tasks of one `gemm` call write pairwise disjoint tiles (their
// row ranges × column ranges partition the output), and `gemm` holds the
// `&mut` borrow of the whole output until every task has finished.
unsafe impl Send for SharedC {}
// SAFETY: as for Send.
unsafe impl Sync for SharedC {}

impl SharedC {
    /// A method, not a field access, so that closures capture the whole
    /// (Sync) wrapper rather than the raw pointer inside it.
    fn at(self, row: usize, col: usize) -> *mut f32 {
        self.ptr.wrapping_add(row * self.ldc + col)
    }
}

/// One product of a sum: `a` views `op(a)ᵀ` (`[k, m]`), `b` views `op(b)`
/// (`[k, n]`).
pub(super) struct Product<'a, S> {
    pub a: View<'a, S>,
    pub b: View<'a, S>,
    pub k: usize,
}

/// `c[m,n] = init + Σ op(a)·op(b)` over `products` with micro-kernel `u`
/// (`init`, when given, a stored `[m, n]` matrix): one accumulation through
/// the k of every product in turn, as if their k were concatenated, so a
/// sum of products (and an addend) costs one pass over `c`.
pub(super) fn gemm<E: Packed, T: Elem, S: Source>(
    u: &Micro<E>,
    products: &[Product<S>],
    init: Option<&S>,
    epilogue: Option<&Epilogue>,
    c: &mut [T],
    m: usize,
    n: usize,
) {
    assert_eq!(c.len(), m * n, "gemm: c");
    assert!(u.mr * u.nr <= MAX_TILE && u.mc.is_multiple_of(u.mr) && u.nc.is_multiple_of(u.nr));
    assert!(u.kc.is_multiple_of(E::K));
    if m == 0 || n == 0 {
        return;
    }
    let k_all: usize = products.iter().map(|p| p.k).sum();
    let k_max = products.iter().map(|p| p.k).max().unwrap_or(0);
    let threads = if m * k_all * n >= PAR_MIN_WORK && !super::is_serial() {
        rayon::current_num_threads()
    } else {
        1
    };
    // Super-slabs of whole epilogue groups (RoPE's heads).
    let group = epilogue.map_or(1, |e| e.group());
    let ns = (u.nc * SLABS_PER_SUPER / group).max(1) * group;
    // m blocks of equal size, up to a quarter over mc: every m block packs
    // all of B again, so 1024 rows are one block, not 1008 and a 16-row
    // block that would pack (and dequantize) the whole of B for 16 rows.
    let blocks = m.div_ceil(u.mc + u.mc / 4);
    let mc_all = m.div_ceil(blocks).next_multiple_of(u.mr);
    let a_len = mc_all * u.steps(u.kc.min(k_max));
    let c_len = if T::as_f32_mut(&mut []).is_some() {
        0
    } else {
        mc_all.min(m) * ns.min(n)
    };
    with_buf(&C_BUF, c_len, |cbuf: &mut [f32]| {
        with_buf(&A_BUF, a_len, |abuf: &mut [E]| {
            for i0 in (0..m).step_by(mc_all) {
                let mc = mc_all.min(m - i0);
                for s0 in (0..n).step_by(ns) {
                    let width = ns.min(n - s0);
                    let out = match T::as_f32_mut(c) {
                        Some(c) => SharedC {
                            ptr: c[i0 * n + s0..].as_mut_ptr(),
                            ldc: n,
                        },
                        None => SharedC {
                            ptr: cbuf.as_mut_ptr(),
                            ldc: width,
                        },
                    };
                    let block = Block {
                        mc,
                        cols: (s0, width),
                        i0,
                    };
                    if k_all == 0 || init.is_some() {
                        for i in 0..mc {
                            // SAFETY: row i of the block, `width` columns.
                            let row =
                                unsafe { std::slice::from_raw_parts_mut(out.at(i, 0), width) };
                            match init {
                                Some(src) => src.row_f32(i0 + i, s0, row),
                                None => row.fill(0.0),
                            }
                        }
                    }
                    let mut accumulate = init.is_some();
                    for p in products {
                        for p0 in (0..p.k).step_by(u.kc) {
                            let kc = u.kc.min(p.k - p0);
                            let k_block = KBlock { p0, kc, accumulate };
                            run_k_block(u, p, abuf, out, threads, &block, k_block);
                            accumulate = true;
                        }
                    }
                    match T::as_f32_mut(c) {
                        Some(c) => {
                            if let Some(e) = epilogue {
                                let rows = c[i0 * n..(i0 + mc) * n].par_chunks_mut(n);
                                rows.enumerate().for_each(|(i, row)| {
                                    e.apply(i0 + i, s0, &mut row[s0..s0 + width])
                                });
                            }
                        }
                        None => {
                            let rows = c[i0 * n..(i0 + mc) * n].par_chunks_mut(n);
                            let accs = cbuf.par_chunks_mut(width);
                            rows.zip(accs).enumerate().for_each(|(i, (row, acc))| {
                                if let Some(e) = epilogue {
                                    e.apply(i0 + i, s0, acc);
                                }
                                for (o, &v) in row[s0..s0 + width].iter_mut().zip(acc.iter()) {
                                    *o = T::from_f32(v);
                                }
                            });
                        }
                    }
                }
            }
        })
    });
}

/// k `p0..p0+kc` of one product; `accumulate` unless it is the first
/// block of the sum (which overwrites the output without reading it).
#[derive(Clone, Copy)]
struct KBlock {
    p0: usize,
    kc: usize,
    accumulate: bool,
}

/// The (m block, super-slab) being computed: rows `i0..i0+mc` and columns
/// `cols.0..cols.0+cols.1` of the output.
struct Block {
    mc: usize,
    cols: (usize, usize),
    i0: usize,
}

/// One k block of one (m block, super-slab): packs the A block, then splits
/// the columns over the tasks (each then packs only its own part of B), the
/// rows too when there are too few columns.
fn run_k_block<E: Packed, S: Source>(
    u: &Micro<E>,
    product: &Product<S>,
    abuf: &mut [E],
    out: SharedC,
    threads: usize,
    block: &Block,
    k_block: KBlock,
) {
    let Block { mc, cols, i0 } = *block;
    let KBlock { p0, kc, .. } = k_block;
    let (a, b) = (&product.a, &product.b);
    let steps = u.steps(kc);
    let m_panels = mc.div_ceil(u.mr);
    let apack = &mut abuf[..m_panels * u.mr * steps];
    // op(a)'s stored rows read in place: whole tile blocks of k, rows
    // aligned as the kernel wants them; the last panel, when partial, is
    // packed.
    let in_place = u
        .rows_kernel
        .and(a.trans.then(|| a.src.bf16_rows()).flatten())
        .filter(|&(d, ld)| {
            let at = d.as_ptr() as usize + 2 * (i0 * ld + p0);
            kc.is_multiple_of(u.step_align * E::K)
                && (2 * ld).is_multiple_of(u.rows_align)
                && at.is_multiple_of(u.rows_align)
                && (u.mr.div_ceil(l1_sets_spanned(2 * ld)) <= u.rows_per_set || cols.1 <= u.nr)
        })
        .map(|(d, ld)| (&d[i0 * ld + p0..], ld));
    // The panels in `d` from row `r0` of the block.
    let pack = |r0: usize, d: &mut [E]| {
        let rows = (d.len() / steps).min(mc - r0);
        if u.a_tiled {
            a.pack_tiled(d, (p0, kc), (i0 + r0, rows), u.mr, u.step_align);
        } else {
            a.pack(d, (p0, kc), (i0 + r0, rows), u.mr, steps);
        }
    };
    // Calls of `group` panels, reading runs of PACK_COLS where stored rows
    // run across panels.
    let panels = match u.a_tiled || !a.trans {
        true => (PACK_COLS / u.mr).max(1),
        false => 1,
    };
    let group = u.mr * steps * panels;
    let at = |(g, d): (usize, &mut [E])| pack(g * group / steps, d);
    match in_place {
        // Only a partial last panel is packed.
        Some(_) if !mc.is_multiple_of(u.mr) => {
            let r0 = (m_panels - 1) * u.mr;
            pack(r0, &mut apack[r0 * steps..]);
        }
        Some(_) => {}
        None if threads > 1 => apack.par_chunks_mut(group).enumerate().for_each(at),
        None => apack.chunks_mut(group).enumerate().for_each(at),
    }
    let apack = &*apack;
    let n_panels = cols.1.div_ceil(u.nr);
    let tn = threads.min(n_panels);
    let tm = (threads / tn).min(m_panels);
    let task = |t: usize| {
        let part = Part {
            in_place,
            rows: split(m_panels, tm, t / tn),
            panels: split(n_panels, tn, t % tn),
            mc,
            cols,
            k_block,
        };
        run_part(u, b, apack, out, part);
    };
    if tm * tn > 1 {
        (0..tm * tn).into_par_iter().for_each(task);
    } else {
        task(0);
    }
}

/// How many L1 sets rows `stride` bytes apart fall into, with the 4 KiB
/// set period of the L1 caches these kernels run on (32 or 48 KiB, 8 or
/// 12 ways, 64-byte lines).
fn l1_sets_spanned(stride: usize) -> usize {
    const PERIOD: usize = 4096;
    const LINE: usize = 64;
    let common = 1usize << stride.trailing_zeros().min(PERIOD.trailing_zeros());
    (PERIOD / common).min(PERIOD / LINE)
}

/// Part `i` of `0..total` cut into `parts` near-equal contiguous ranges.
fn split(total: usize, parts: usize, i: usize) -> Range<usize> {
    let (q, r) = (total / parts, total % parts);
    let start = i * q + i.min(r);
    start..start + q + usize::from(i < r)
}

/// One task's share of one k block: A panels `rows` × B panels `panels` of
/// the block's `mc` rows and `cols` columns.
struct Part<'a> {
    /// op(a)'s rows from the block's first, at its first k, and their
    /// stride, when the kernel reads them in place.
    in_place: Option<(&'a [crate::bf16], usize)>,
    rows: Range<usize>,
    panels: Range<usize>,
    mc: usize,
    cols: (usize, usize),
    k_block: KBlock,
}

fn run_part<E: Packed>(u: &Micro<E>, b: &View<impl Source>, apack: &[E], out: SharedC, part: Part) {
    let Part {
        in_place,
        rows,
        panels,
        mc,
        cols: (c0, width),
        k_block: KBlock { p0, kc, accumulate },
    } = part;
    if let Some(setup) = u.setup {
        // SAFETY: as for the kernel: `u` was chosen only after its CPU
        // features were checked.
        unsafe { setup() };
    }
    let slab = u.nc / u.nr;
    let steps = u.steps(kc);
    let (a_step, b_step) = (u.mr * steps, u.nr * steps);
    with_buf(
        &B_BUF,
        slab.min(panels.len()) * b_step,
        |bbuf: &mut [E]| {
            for s0 in panels.clone().step_by(slab) {
                let s1 = (s0 + slab).min(panels.end);
                let bpack = &mut bbuf[..(s1 - s0) * b_step];
                let j0 = s0 * u.nr;
                let ncols = (s1 * u.nr).min(width) - j0;
                b.pack(bpack, (p0, kc), (c0 + j0, ncols), u.nr, steps);
                for ip in rows.clone() {
                    let r0 = ip * u.mr;
                    let nrows = u.mr.min(mc - r0);
                    let apanel = match in_place {
                        Some((d, ld)) if nrows == u.mr => APanel::Rows(&d[r0 * ld..], ld),
                        _ => APanel::Packed(&apack[ip * a_step..][..a_step]),
                    };
                    for (q, bpanel) in bpack.chunks_exact(b_step).enumerate() {
                        let j0 = (s0 + q) * u.nr;
                        let ncols = u.nr.min(width - j0);
                        // The next tile of `c` (right, else the next row panel
                        // of the slab), on its way into cache while this one
                        // computes: `c` is too large for L2 and read every k block.
                        let next = if s0 + q + 1 < s1 {
                            (r0, j0 + u.nr)
                        } else {
                            (r0 + u.mr, s0 * u.nr)
                        };
                        if next.0 < mc {
                            prefetch_tile(out, next, u.mr.min(mc - next.0));
                        }
                        // SAFETY: `u` was chosen only after its CPU features were
                        // checked; the panels hold steps·mr and steps·nr elements;
                        // rows r0..r0+nrows and columns j0..j0+ncols lie inside
                        // the block, in this task's disjoint share of it.
                        unsafe {
                            tile(
                                u,
                                steps,
                                apanel,
                                bpanel,
                                out,
                                (r0, j0),
                                (nrows, ncols),
                                accumulate,
                            )
                        };
                    }
                }
            }
        },
    );
}

#[inline]
/// Asks for the first `rows` rows of the tile at `at` (one or two cache
/// lines each) to be brought into L1.
fn prefetch_tile(out: SharedC, (r0, j0): (usize, usize), rows: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for i in 0..rows {
        let row = out.at(r0 + i, j0);
        // SAFETY: a prefetch is a hint: it never faults nor changes memory,
        // whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16) as *const i8);
        }
    }
}

/// The A side of a micro-kernel call: a packed panel, or `mr` stored bf16
/// rows `ld` apart from the slice's start.
#[derive(Clone, Copy)]
enum APanel<'a, E> {
    Packed(&'a [E]),
    Rows(&'a [crate::bf16], usize),
}

impl<E: Packed> APanel<'_, E> {
    /// The micro-kernel on this panel and B panel `b`.
    ///
    /// # Safety
    /// As [`Kernel`] for the tile at `c`; `u` has a rows kernel when `self`
    /// is `Rows`, whose rows hold `2·steps` elements from the start.
    unsafe fn run(
        self,
        u: &Micro<E>,
        steps: usize,
        b: &[E],
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                APanel::Packed(a) => (u.kernel)(steps, a.as_ptr(), b.as_ptr(), c, ldc, accumulate),
                APanel::Rows(a, lda) => {
                    debug_assert!(a.len() >= (u.mr - 1) * lda + 2 * steps);
                    let kernel = u
                        .rows_kernel
                        .expect("rows are read in place by a rows kernel");
                    kernel(
                        steps,
                        a.as_ptr().cast(),
                        lda,
                        b.as_ptr(),
                        c,
                        ldc,
                        accumulate,
                    )
                }
            }
        }
    }
}

/// One micro-kernel call on the `rows`×`cols` corner of the tile at
/// (`r0`, `j0`); a ragged edge tile goes through a full-size buffer.
///
/// # Safety
/// As [`Kernel`], except that only `rows`×`cols` of the tile need be valid.
#[allow(clippy::too_many_arguments)]
unsafe fn tile<E: Packed>(
    u: &Micro<E>,
    steps: usize,
    a: APanel<E>,
    b: &[E],
    out: SharedC,
    (r0, j0): (usize, usize),
    (rows, cols): (usize, usize),
    accumulate: bool,
) {
    let c = out.at(r0, j0);
    if rows == u.mr && cols == u.nr {
        // SAFETY: the full tile is inside the output (the caller's contract).
        unsafe { a.run(u, steps, b, c, out.ldc, accumulate) };
        return;
    }
    // Not zeroed up front: at small n or k (the LoRA products) nearly every
    // tile is ragged and does little work, so 4 KiB of stores would dominate.
    // Without `accumulate` the kernel writes the whole tile before reading it.
    let mut t = std::mem::MaybeUninit::<[f32; MAX_TILE]>::uninit();
    let tp = t.as_mut_ptr().cast::<f32>();
    if accumulate {
        for i in 0..u.mr {
            // SAFETY: row i of `t` (nr floats at i·nr) lies inside it; row
            // i < rows, columns 0..cols of the tile are inside the output.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(tp.add(i * u.nr), u.nr);
                let valid = if i < rows { cols } else { 0 };
                if valid > 0 {
                    dst[..valid]
                        .copy_from_slice(std::slice::from_raw_parts(c.add(i * out.ldc), valid));
                }
                dst[valid..].fill(0.0);
            }
        }
    }
    // SAFETY: `t` holds a whole mr×nr tile with row stride nr, initialized
    // when the kernel reads it.
    unsafe { a.run(u, steps, b, tp, u.nr, accumulate) };
    for i in 0..rows {
        // SAFETY: as above; the kernel wrote every element of `t`.
        unsafe { std::ptr::copy_nonoverlapping(tp.add(i * u.nr), c.add(i * out.ldc), cols) };
    }
}

#[cfg(test)]
mod tests {
    use super::l1_sets_spanned;

    #[test]
    fn rows_of_power_of_two_strides_share_sets() {
        // 1024, 2048, 2816 and 4096 bf16 per row.
        assert_eq!(l1_sets_spanned(2048), 2);
        assert_eq!(l1_sets_spanned(4096), 1);
        assert_eq!(l1_sets_spanned(5632), 8);
        assert_eq!(l1_sets_spanned(8192), 1);
        // Other strides spread over all 64.
        assert_eq!(l1_sets_spanned(2 * 1001), 64);
        assert_eq!(l1_sets_spanned(2 * 11008), 8);
    }
}
