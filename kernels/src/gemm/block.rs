//! The blocked driver shared by the SIMD paths: loops over k (KC rows of
//! the packed panels), m (MC rows of `op(a)`) and n (slabs of NC columns of
//! `op(b)`), packing as it goes, and the split of the work over threads.
//!
//! Loop order, innermost last: k blocks → m blocks (A block packed once,
//! shared by all threads) → one rayon task per part of the output → slabs of
//! its columns (B slab packed by the task, kept in its core's L2) → A panels
//! (one MR×KC panel stays in L1) → B panels → micro-kernel. The k blocks are
//! the outer loop so that each output element's terms are summed in order
//! p = 0, 1, …, k−1 (the tile is loaded back from `c` for every k block
//! after the first): how m and n are split, and over how many threads, never
//! changes a result.

use super::pack::{pack_a, pack_b};
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;
use std::thread::LocalKey;

/// A micro-kernel: `c[i,j] (+)= Σ_p a[p·mr + i]·b[p·nr + j]` over an mr×nr
/// tile of `c` with row stride `ldc`, adding to what `c` holds when
/// `accumulate`, else overwriting it without reading it.
///
/// # Safety
/// The CPU has the kernel's target features; `a` and `b` are readable for
/// `kc·mr` and `kc·nr` floats; the tile at `c` (mr rows of nr floats, `ldc`
/// apart) is writable, and readable when `accumulate`.
pub(super) type Kernel =
    unsafe fn(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, accumulate: bool);

/// A micro-kernel with its tile and the cache blocking chosen for it.
pub(super) struct Micro {
    /// Rows of the register tile (broadcasts of `op(a)`).
    pub mr: usize,
    /// Columns of the register tile (vectors of `op(b)`).
    pub nr: usize,
    /// Depth of a packed panel: an mr×kc A panel lives in L1.
    pub kc: usize,
    /// Rows of `op(a)` packed at once (a multiple of mr); bounds the A buffer.
    pub mc: usize,
    /// Columns of a packed B slab (a multiple of nr): kc×nc lives in L2.
    pub nc: usize,
    /// Only ever called once the CPU is known to have its features.
    pub kernel: Kernel,
}

/// The largest register tile (AVX-512's 14×32): ragged edge tiles go
/// through a buffer of this size on the stack.
const MAX_TILE: usize = 14 * 32;

/// Below this many multiply-adds (m·k·n: ~15 µs on one core here) one
/// thread does the whole product: waking the pool and the two joins per
/// (k block, m block) cost microseconds each.
const PAR_MIN_WORK: usize = 1 << 20;

thread_local! {
    /// Packed A blocks and B slabs, kept per thread between calls so that a
    /// training step's many matmuls do not allocate (and fault in) fresh
    /// megabytes each time.
    static A_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    static B_BUF: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` on a 64-byte-aligned slice of `len` floats from `key`'s buffer.
/// The buffer is taken out while in use, so a nested call on the same thread
/// (rayon may run another task while this one waits) gets its own.
fn with_buf<R>(
    key: &'static LocalKey<Cell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    const PAD: usize = 64 / size_of::<f32>();
    let mut v = key.take();
    if v.len() < len + PAD {
        v.resize(len + PAD, 0.0);
    }
    // Aligned panels keep every vector load of a packed row in one cache line.
    let off = v.as_ptr().align_offset(64);
    assert!(off < PAD, "f32 pointers are 4-byte aligned");
    let r = f(&mut v[off..off + len]);
    key.set(v);
    r
}

/// The output matrix, shared by the tasks that write disjoint tiles of it.
#[derive(Clone, Copy)]
struct SharedC(*mut f32);

// SAFETY: the tasks of one `gemm` call write pairwise disjoint tiles (their
// row ranges × column ranges partition the output), and `gemm` holds the
// `&mut` borrow of the whole output until every task has finished.
unsafe impl Send for SharedC {}
// SAFETY: as for Send.
unsafe impl Sync for SharedC {}

impl SharedC {
    /// A method, not a field access, so that closures capture the whole
    /// (Sync) wrapper rather than the raw pointer inside it.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `c[m,n] = op(a)·op(b)` with micro-kernel `u`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    u: &Micro,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) {
    assert_eq!(a.len(), m * k, "sgemm: a");
    assert_eq!(b.len(), k * n, "sgemm: b");
    assert_eq!(c.len(), m * n, "sgemm: c");
    assert!(u.mr * u.nr <= MAX_TILE && u.mc.is_multiple_of(u.mr) && u.nc.is_multiple_of(u.nr));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let threads = if m * k * n >= PAR_MIN_WORK {
        rayon::current_num_threads()
    } else {
        1
    };
    let n_panels = n.div_ceil(u.nr);
    let out = SharedC(c.as_mut_ptr());
    let a_len = u.mc.min(m.div_ceil(u.mr) * u.mr) * u.kc.min(k);
    with_buf(&A_BUF, a_len, |abuf| {
        for p0 in (0..k).step_by(u.kc) {
            let kc = u.kc.min(k - p0);
            for i0 in (0..m).step_by(u.mc) {
                let mc = u.mc.min(m - i0);
                let m_panels = mc.div_ceil(u.mr);
                let apack = &mut abuf[..m_panels * u.mr * kc];
                let pack = |(q, d): (usize, &mut [f32])| {
                    let r0 = q * u.mr;
                    pack_a(a, d, m, k, ta, (i0 + r0, u.mr.min(mc - r0)), (p0, kc), u.mr);
                };
                if threads > 1 {
                    apack.par_chunks_mut(u.mr * kc).enumerate().for_each(pack);
                } else {
                    apack.chunks_mut(u.mr * kc).enumerate().for_each(pack);
                }
                let apack = &*apack;
                // Split the columns first (each task then packs only its own
                // part of B); the rows only when there are too few columns.
                let tn = threads.min(n_panels);
                let tm = (threads / tn).min(m_panels);
                let task = |t: usize| {
                    let part = Part {
                        rows: split(m_panels, tm, t / tn),
                        cols: split(n_panels, tn, t % tn),
                        i0,
                        mc,
                        p0,
                        kc,
                    };
                    run_part(u, b, apack, out, k, n, tb, part);
                };
                if tm * tn > 1 {
                    (0..tm * tn).into_par_iter().for_each(task);
                } else {
                    task(0);
                }
            }
        }
    });
}

/// Part `i` of `0..total` cut into `parts` near-equal contiguous ranges.
fn split(total: usize, parts: usize, i: usize) -> Range<usize> {
    let (q, r) = (total / parts, total % parts);
    let start = i * q + i.min(r);
    start..start + q + usize::from(i < r)
}

/// One task's share of one (k block, m block): A panels `rows` × B panels
/// `cols` of the output.
struct Part {
    rows: Range<usize>,
    cols: Range<usize>,
    i0: usize,
    mc: usize,
    p0: usize,
    kc: usize,
}

#[allow(clippy::too_many_arguments)]
fn run_part(
    u: &Micro,
    b: &[f32],
    apack: &[f32],
    out: SharedC,
    k: usize,
    n: usize,
    tb: bool,
    part: Part,
) {
    let Part {
        rows,
        cols,
        i0,
        mc,
        p0,
        kc,
    } = part;
    let slab = u.nc / u.nr;
    let (a_step, b_step) = (u.mr * kc, u.nr * kc);
    with_buf(&B_BUF, slab.min(cols.len()) * b_step, |bbuf| {
        for s0 in cols.clone().step_by(slab) {
            let s1 = (s0 + slab).min(cols.end);
            let bpack = &mut bbuf[..(s1 - s0) * b_step];
            let j0 = s0 * u.nr;
            let cols = (s1 * u.nr).min(n) - j0;
            pack_b(b, bpack, k, n, tb, (p0, kc), (j0, cols), u.nr);
            for ip in rows.clone() {
                let apanel = &apack[ip * a_step..][..a_step];
                let r0 = i0 + ip * u.mr;
                let nrows = u.mr.min(i0 + mc - r0);
                for (q, bpanel) in bpack.chunks_exact(b_step).enumerate() {
                    let j0 = (s0 + q) * u.nr;
                    let ncols = u.nr.min(n - j0);
                    // The next tile of `c` (right, else the next row panel
                    // of the slab), on its way into cache while this one
                    // computes: `c` is too large for L2 and read every k block.
                    let next = if s0 + q + 1 < s1 {
                        (r0, j0 + u.nr)
                    } else {
                        (r0 + u.mr, s0 * u.nr)
                    };
                    if next.0 < i0 + mc {
                        prefetch_tile(out.at(next.0 * n + next.1), n, u.mr.min(i0 + mc - next.0));
                    }
                    // SAFETY: `u` was chosen only after its CPU features were
                    // checked; the panels hold kc·mr and kc·nr floats; rows
                    // r0..r0+nrows and columns j0..j0+ncols lie inside the
                    // m×n output, in this task's disjoint share of it.
                    unsafe {
                        tile(
                            u,
                            kc,
                            apanel,
                            bpanel,
                            out.at(r0 * n + j0),
                            n,
                            (nrows, ncols),
                            p0 > 0,
                        )
                    };
                }
            }
        }
    });
}

/// Asks for the first `rows` rows of a tile of `c` (one or two cache lines
/// each) to be brought into L1.
fn prefetch_tile(c: *mut f32, ldc: usize, rows: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    for i in 0..rows {
        let row = c.wrapping_add(i * ldc);
        // SAFETY: a prefetch is a hint: it never faults nor changes memory,
        // whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(16) as *const i8);
        }
    }
}

/// One micro-kernel call on the `rows`×`cols` corner of a tile at `c`; a
/// ragged edge tile goes through a full-size buffer.
///
/// # Safety
/// As [`Kernel`], except that only `rows`×`cols` of the tile at `c` need be
/// valid.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    u: &Micro,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    (rows, cols): (usize, usize),
    accumulate: bool,
) {
    if rows == u.mr && cols == u.nr {
        // SAFETY: the full tile is inside the output (the caller's contract).
        unsafe { (u.kernel)(kc, a.as_ptr(), b.as_ptr(), c, ldc, accumulate) };
        return;
    }
    let mut t = [0f32; MAX_TILE];
    if accumulate {
        for i in 0..rows {
            // SAFETY: row i, columns 0..cols of the tile are inside the output.
            let row = unsafe { std::slice::from_raw_parts(c.add(i * ldc), cols) };
            t[i * u.nr..][..cols].copy_from_slice(row);
        }
    }
    // SAFETY: `t` holds a whole mr×nr tile with row stride nr.
    unsafe { (u.kernel)(kc, a.as_ptr(), b.as_ptr(), t.as_mut_ptr(), u.nr, accumulate) };
    for i in 0..rows {
        // SAFETY: as above.
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), cols) };
        row.copy_from_slice(&t[i * u.nr..][..cols]);
    }
}
