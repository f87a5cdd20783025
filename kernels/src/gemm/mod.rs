//! GEMM in the BLIS style: operands packed into panels, cache blocking, a
//! register-tile micro-kernel per instruction set, chosen at run time; for
//! dense operands of any storage type and for NF4 weights, dequantized as
//! their panels are packed so that 4-bit weights are never expanded whole.
//!
//! `c[m,n] = op(a)·op(b)` with the same meaning of `ta`/`tb` as
//! [`crate::matmul::matmul`] (and, for NF4, [`crate::nf4::nf4_matmul`]),
//! which stay the reference twins and the scalar path. Each output element
//! is summed in one fixed order (its k terms in sequence, with fused
//! multiply-adds or pairwise bf16 dot products), whatever the blocking over
//! m and n or the number of threads: a path's results are bit for bit the
//! same run to run and on any thread count. Different paths may differ from
//! each other in the last bits.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
#[cfg(target_arch = "x86_64")]
mod block;
#[cfg(target_arch = "x86_64")]
mod operand;
#[cfg(target_arch = "x86_64")]
mod transpose;

use crate::nf4::Nf4;
use crate::rope::RopeTable;
use crate::Elem;
use half::{bf16, f16};
use std::sync::OnceLock;

/// An implementation of the GEMM, by the instructions it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The reference kernels ([`crate::matmul::matmul`],
    /// [`crate::nf4::nf4_matmul`]).
    Scalar,
    /// AVX2 + FMA: a 6×16 f32 register tile; bf16 and f16 operands widened
    /// to f32 as they are packed.
    Avx2,
    /// AVX-512F: a 14×32 f32 register tile, operands widened likewise.
    Avx512,
    /// AVX-512F for f32 operands, and for bf16 ones (and NF4 weights in bf16
    /// compute) the AVX512-BF16 dot-product kernel on a 12×32 tile.
    Avx512Bf16,
    /// AVX-512F for f32 operands, AMX tiles (32×32) for bf16 ones.
    Amx,
}

impl Path {
    pub const ALL: [Path; 5] = [
        Path::Scalar,
        Path::Avx2,
        Path::Avx512,
        Path::Avx512Bf16,
        Path::Amx,
    ];

    /// The name `GRAFT_CPU` uses.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
            Path::Avx512Bf16 => "avx512bf16",
            Path::Amx => "amx",
        }
    }

    pub fn parse(s: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The CPU feature this path needs and this CPU lacks, if any.
    pub fn missing_feature(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            if self == Path::Amx {
                return amx::missing();
            }
            let needs: &[(&str, bool)] = match self {
                Path::Scalar => &[],
                Path::Avx2 => &[
                    ("avx2", is_x86_feature_detected!("avx2")),
                    ("fma", is_x86_feature_detected!("fma")),
                ],
                Path::Avx512 => &[("avx512f", is_x86_feature_detected!("avx512f"))],
                Path::Avx512Bf16 => &[
                    ("avx512f", is_x86_feature_detected!("avx512f")),
                    ("avx512bf16", is_x86_feature_detected!("avx512bf16")),
                ],
                Path::Amx => unreachable!("answered above"),
            };
            needs.iter().find(|(_, has)| !has).map(|(f, _)| *f)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            match self {
                Path::Scalar => None,
                _ => Some("an x86-64 CPU"),
            }
        }
    }

    pub fn is_supported(self) -> bool {
        self.missing_feature().is_none()
    }

    /// The fastest path this CPU supports. AMX before AVX512-BF16: the CPUs
    /// that have AMX issue `vdpbf16ps` at a quarter of the FMA rate.
    pub fn best() -> Path {
        [Path::Amx, Path::Avx512Bf16, Path::Avx512, Path::Avx2]
            .into_iter()
            .find(|p| p.is_supported())
            .unwrap_or(Path::Scalar)
    }

    /// The path `GRAFT_CPU` asks for (the best one when it is unset or
    /// empty), or why it cannot be taken: not a path's name, or a path
    /// needing a feature this CPU lacks. Programs check this at start-up
    /// so that a bad setting is an error, not a slow surprise.
    pub fn requested() -> Result<Path, String> {
        let Some(s) = std::env::var("GRAFT_CPU").ok().filter(|s| !s.is_empty()) else {
            return Ok(Path::best());
        };
        let names: Vec<&str> = Path::ALL.iter().map(|p| p.name()).collect();
        let p = Path::parse(&s)
            .ok_or_else(|| format!("GRAFT_CPU={s} is not one of {}", names.join(", ")))?;
        match p.missing_feature() {
            None => Ok(p),
            Some(f) => Err(format!(
                "GRAFT_CPU={s} needs the CPU feature {f}, which this CPU lacks (it supports up to {})",
                Path::best().name()
            )),
        }
    }

    /// The path the kernels take: [`Path::requested`], else (for library
    /// users who did not check it) the best one with a one-line notice on
    /// stderr. Decided once per process, so every matmul of a run, and of
    /// a resumed run, takes the same path. A CPU without AVX2 gets a notice
    /// that matmuls take the slow scalar path.
    pub fn active() -> Path {
        static ACTIVE: OnceLock<Path> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let chosen = Path::requested().unwrap_or_else(|e| {
                eprintln!("graft: {e}; using {}", Path::best().name());
                Path::best()
            });
            if chosen == Path::Scalar && std::env::var_os("GRAFT_CPU").is_none() {
                eprintln!("graft: this CPU has neither AVX-512 nor AVX2+FMA; matmuls take the slow scalar path");
            }
            chosen
        })
    }

    fn check(self, what: &str) {
        if let Some(f) = self.missing_feature() {
            panic!(
                "{what}: the {} path needs {f}, which this CPU lacks",
                self.name()
            );
        }
    }
}

thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every GEMM it calls on this thread single-threaded: for
/// callers that split their work over the thread pool themselves (attention
/// runs one task per head), where splitting each small product again would
/// only add synchronisation.
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.replace(true);
    let r = f();
    SERIAL.set(before);
    r
}

/// Whether [`serial`] is in force on this thread.
#[cfg(target_arch = "x86_64")]
fn is_serial() -> bool {
    SERIAL.get()
}

/// A stored matrix operand of [`gemm_sum`], row-major.
#[derive(Clone, Copy)]
pub enum Operand<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// An NF4 matrix (a frozen weight), dequantized as its panels are packed.
    Nf4(&'a Nf4<'a>),
}

impl Operand<'_> {
    fn len(&self) -> usize {
        match self {
            Operand::F32(d) => d.len(),
            Operand::Bf16(d) => d.len(),
            Operand::F16(d) => d.len(),
            Operand::Nf4(w) => w.rows * w.cols,
        }
    }

    /// Elements per stored row, for a matrix of `rows` rows; an NF4 matrix
    /// must be stored with exactly that many.
    fn row_len(&self, rows: usize, what: &str) -> usize {
        let cols = self.len().checked_div(rows).unwrap_or(0);
        if let Operand::Nf4(w) = self {
            assert_eq!(
                w.rows, rows,
                "gemm_sum: NF4 {what} has {} rows, not {rows}",
                w.rows
            );
        }
        cols
    }

    /// The values as f32: scaled, then rounded to bf16 when `round`.
    fn to_f32(self, scale: f32, round: bool) -> Vec<f32> {
        let mut v: Vec<f32> = match self {
            Operand::F32(d) => d.to_vec(),
            Operand::Bf16(d) => d.iter().map(|x| x.to_f32()).collect(),
            Operand::F16(d) => d.iter().map(|x| x.to_f32()).collect(),
            Operand::Nf4(w) => {
                let mut out = vec![0f32; w.rows * w.cols];
                w.dequantize_into(0, &mut out);
                out
            }
        };
        for x in v.iter_mut() {
            *x *= scale;
            if round {
                *x = bf16::from_f32(*x).to_f32();
            }
        }
        v
    }
}

/// What [`gemm_sum`] does to each output row, in f32, once the row's sum
/// is complete and before it is rounded to the output's type: the
/// elementwise work after a product done while the row is in cache.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// Column `j` times `scale[j]` (DoRA's magnitude over the weight norm).
    ScaleCols(&'a [f32]),
    /// RoPE: row `i`'s heads rotated by `positions[i]` (the q and k
    /// projections).
    Rope {
        positions: &'a [i32],
        table: &'a RopeTable,
    },
}

impl Epilogue<'_> {
    /// Columns the epilogue needs together in one pass (a head for RoPE):
    /// the driver's column blocks are multiples of it.
    fn group(&self) -> usize {
        match self {
            Epilogue::ScaleCols(_) => 1,
            Epilogue::Rope { table, .. } => table.head_dim(),
        }
    }

    /// Applies to columns `c0..c0 + vals.len()` of output row `i` (whole
    /// groups).
    #[inline]
    fn apply(&self, i: usize, c0: usize, vals: &mut [f32]) {
        match *self {
            Epilogue::ScaleCols(s) => {
                for (v, s) in vals.iter_mut().zip(&s[c0..]) {
                    *v *= s;
                }
            }
            Epilogue::Rope { positions, table } => table.rotate(positions[i], vals),
        }
    }

    fn check(&self, m: usize, n: usize) {
        match *self {
            Epilogue::ScaleCols(s) => assert_eq!(s.len(), n, "gemm_sum: column scales"),
            Epilogue::Rope { positions, table } => {
                assert_eq!(positions.len(), m, "gemm_sum: RoPE positions");
                assert!(n.is_multiple_of(table.head_dim()), "gemm_sum: RoPE heads");
            }
        }
    }
}

/// One product of [`gemm_sum`]: `scale · op(a)·op(b)`, `op(a)` `[m, k]`,
/// `op(b)` `[k, n]`; `a` is stored `[m, k]` (`[k, m]` when `ta`), `b`
/// `[k, n]` (`[n, k]` when `tb`: a weight `W[n, k]` in `x·Wᵀ`).
#[derive(Clone, Copy)]
pub struct Term<'a> {
    pub a: Operand<'a>,
    pub b: Operand<'a>,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub scale: f32,
}

impl Term<'_> {
    fn check(&self, m: usize, n: usize) {
        assert_eq!(self.a.len(), m * self.k, "gemm_sum: a");
        assert_eq!(self.b.len(), self.k * n, "gemm_sum: b");
        let (ar, br) = (
            if self.ta { self.k } else { m },
            if self.tb { n } else { self.k },
        );
        self.a.row_len(ar, "a");
        self.b.row_len(br, "b");
    }
}

/// `c[m,n] = epilogue(init + Σ scale·op(a)·op(b))` over `terms` on
/// [`Path::active`], summed in f32, the epilogue applied in f32, rounded
/// once to `c`'s type; `init`, when given, is a dense `[m, n]` addend (read
/// exactly). With `bf16`, every operand value of a product is rounded to
/// bf16 (after its scale) and the products are taken by the bf16 kernels
/// where the path has them; else in f32.
pub fn gemm_sum<T: Elem>(
    terms: &[Term],
    init: Option<Operand>,
    epilogue: Option<Epilogue>,
    c: &mut [T],
    (m, n): (usize, usize),
    bf16: bool,
) {
    gemm_sum_on(Path::active(), terms, init, epilogue, c, (m, n), bf16)
}

/// [`gemm_sum`] on a given path, so that tests cover every path on one machine.
///
/// # Panics
/// If this CPU does not support `path` (see [`Path::missing_feature`]), or
/// an operand's length does not match its term's shape.
pub fn gemm_sum_on<T: Elem>(
    path: Path,
    terms: &[Term],
    init: Option<Operand>,
    epilogue: Option<Epilogue>,
    c: &mut [T],
    (m, n): (usize, usize),
    bf16: bool,
) {
    path.check("gemm");
    assert_eq!(c.len(), m * n, "gemm_sum: c");
    terms.iter().for_each(|t| t.check(m, n));
    if let Some(e) = &epilogue {
        e.check(m, n);
    }
    let epilogue = epilogue.as_ref();
    if let Some(i) = &init {
        assert_eq!(i.len(), m * n, "gemm_sum: init");
        assert!(!matches!(i, Operand::Nf4(_)), "gemm_sum: an NF4 init");
    }
    #[cfg(target_arch = "x86_64")]
    if path != Path::Scalar {
        use block::Product;
        use operand::{Stored, View};
        fn stored(op: Operand<'_>, rows: usize, scale: f32, round: bool) -> Stored<'_> {
            let ld = op.row_len(rows, "operand");
            Stored {
                op,
                ld,
                scale,
                round,
            }
        }
        // op(a)ᵀ is stored transposed unless `ta`; op(b) as is unless `tb`.
        let sources: Vec<_> = terms
            .iter()
            .map(|t| {
                // A power-of-two scale (LoRA's alpha/r) moves to a dense b
                // no larger than a, the same product exactly unless a scaled
                // value leaves the normal range (subnormal or infinite): scaling costs
                // a pass through f32 in packing, and stored bf16 rows are
                // read in place only unscaled (LoRA's `2·dy·B` and
                // `2·dyᵀ·(x·Aᵀ)` scale their small factor instead of dy).
                let pow2 = t.scale.is_normal() && t.scale.to_bits() & 0x007f_ffff == 0;
                let (sa, sb) =
                    match pow2 && !matches!(t.b, Operand::Nf4(_)) && t.b.len() <= t.a.len() {
                        true => (1.0, t.scale),
                        false => (t.scale, 1.0),
                    };
                let a = stored(t.a, if t.ta { t.k } else { m }, sa, bf16);
                let b = stored(t.b, if t.tb { n } else { t.k }, sb, bf16);
                (a, b)
            })
            .collect();
        // Few columns from many rows of an op(a) stored transposed (LoRA's
        // `dB = 2·dyᵀ·(x·Aᵀ)`, 16 columns) run as the transposed product
        // `cᵀ = op(b)ᵀ·op(a)ᵀ`, the two views exchanged: dy is then read as
        // B slabs (rows along k, the cheap direction) instead of transposed
        // into A panels, and the 16 output columns become rows that fill
        // whole register tiles. Each operand keeps its scale and rounding,
        // and each sum its order: the same bits. Zen 4, 2 threads, alternated
        // three times: 1024×1024×16 and 2816×1024×16 `aᵀ·b` 80-85 → 107-128
        // GFLOP/s (gemm_probe); the issue-6 workload's two dB kinds 0.29-0.40
        // → 0.24-0.25 s of 6 steps (`trainer run --profile`).
        let dense = |o: &Operand| !matches!(o, Operand::Nf4(_));
        let swap = init.is_none()
            && epilogue.is_none()
            && (1..=16).contains(&n)
            && m >= 4 * n
            && terms
                .iter()
                .all(|t| t.ta && !t.tb && dense(&t.a) && dense(&t.b));
        let products: Vec<Product<Stored>> = terms
            .iter()
            .zip(&sources)
            .map(|(t, (a, b))| {
                let (a, b) = (
                    View {
                        src: a,
                        trans: !t.ta,
                    },
                    View {
                        src: b,
                        trans: t.tb,
                    },
                );
                let (a, b) = if swap { (b, a) } else { (a, b) };
                Product { a, b, k: t.k }
            })
            .collect();
        let init = init.map(|op| stored(op, m, 1.0, false));
        let (p, i, e) = (&products, init.as_ref(), epilogue);
        fn run<T: Elem>(
            path: Path,
            bf16: bool,
            (p, i, e): (&[Product<Stored>], Option<&Stored>, Option<&Epilogue>),
            c: &mut [T],
            (m, n): (usize, usize),
        ) {
            match path {
                Path::Scalar => unreachable!("taken below"),
                Path::Avx2 => block::gemm(&avx2::MICRO, p, i, e, c, m, n),
                Path::Avx512Bf16 if bf16 => block::gemm(&avx512bf16::MICRO, p, i, e, c, m, n),
                Path::Amx if bf16 => block::gemm(&amx::MICRO, p, i, e, c, m, n),
                Path::Avx512 | Path::Avx512Bf16 | Path::Amx => {
                    block::gemm(&avx512::MICRO, p, i, e, c, m, n)
                }
            }
        }
        if swap {
            let mut ct = vec![0f32; n * m];
            run(path, bf16, (p, i, e), &mut ct, (n, m));
            for (j, row) in ct.chunks(m).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    c[i * n + j] = T::from_f32(v);
                }
            }
        } else {
            run(path, bf16, (p, i, e), c, (m, n));
        }
        return;
    }
    reference_sum(terms, init, epilogue, c, m, n, bf16)
}

/// The scalar path: each term by the reference kernels on f32 copies of its
/// operands, the terms summed in f32.
fn reference_sum<T: Elem>(
    terms: &[Term],
    init: Option<Operand>,
    epilogue: Option<&Epilogue>,
    c: &mut [T],
    m: usize,
    n: usize,
    bf16: bool,
) {
    let mut acc = match init {
        Some(i) => i.to_f32(1.0, false),
        None => vec![0f32; m * n],
    };
    let mut product = vec![0f32; m * n];
    for t in terms {
        let a = t.a.to_f32(t.scale, bf16);
        match t.b {
            Operand::Nf4(w) => {
                let a = if t.ta { transpose(&a, t.k, m) } else { a };
                crate::nf4::nf4_matmul(&a, w, m, t.tb, bf16, &mut product)
            }
            b => {
                let b = b.to_f32(1.0, bf16);
                crate::matmul::matmul(&a, &b, &mut product, m, t.k, n, t.ta, t.tb)
            }
        }
        acc.iter_mut().zip(&product).for_each(|(s, p)| *s += p);
    }
    if let Some(e) = epilogue {
        for (i, row) in acc.chunks_mut(n.max(1)).enumerate() {
            e.apply(i, 0, row);
        }
    }
    for (o, s) in c.iter_mut().zip(acc) {
        *o = T::from_f32(s);
    }
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| x[(i % rows) * cols + i / rows])
        .collect()
}

/// `c[m,n] = op(a)·op(b)` on [`Path::active`]; arguments as
/// [`crate::matmul::matmul`].
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Elem>(
    a: &[T],
    b: &[T],
    c: &mut [T],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) {
    gemm_on(Path::active(), a, b, c, m, k, n, ta, tb)
}

/// [`gemm`] on a given path: one [`Term`] of [`gemm_sum_on`], in bf16 when
/// the operands are bf16.
///
/// # Panics
/// As [`gemm_sum_on`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_on<T: Elem>(
    path: Path,
    a: &[T],
    b: &[T],
    c: &mut [T],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) {
    let term = Term {
        a: T::operand(a),
        b: T::operand(b),
        k,
        ta,
        tb,
        scale: 1.0,
    };
    gemm_sum_on(path, &[term], None, None, c, (m, n), T::BF16)
}

/// `out = a·op(W)` for an NF4 weight on [`Path::active`]; arguments as
/// [`crate::nf4::nf4_matmul`].
pub fn nf4_gemm<T: Elem>(a: &[T], w: &Nf4, m: usize, tb: bool, bf16_compute: bool, out: &mut [T]) {
    nf4_gemm_on(Path::active(), a, w, m, tb, bf16_compute, out)
}

/// [`nf4_gemm`] on a given path: one [`Term`] of [`gemm_sum_on`]. W's
/// panels are dequantized as they are packed (rounded to bf16 in bf16
/// compute, then multiplied by the bf16 kernel where the path has one).
///
/// # Panics
/// As [`gemm_sum_on`].
pub fn nf4_gemm_on<T: Elem>(
    path: Path,
    a: &[T],
    w: &Nf4,
    m: usize,
    tb: bool,
    bf16_compute: bool,
    out: &mut [T],
) {
    // op(W) is [k, n]: Wᵀ (the forward x·Wᵀ) when `tb`.
    let (k, n) = if tb {
        (w.cols, w.rows)
    } else {
        (w.rows, w.cols)
    };
    let term = Term {
        a: T::operand(a),
        b: Operand::Nf4(w),
        k,
        ta: false,
        tb,
        scale: 1.0,
    };
    gemm_sum_on(path, &[term], None, None, out, (m, n), bf16_compute)
}
