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

use crate::nf4::Nf4;
use crate::Elem;
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
    /// compute) the AVX512-BF16 dot-product kernel on the same 14×32 tile.
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

/// `c[m,n] = op(a)·op(b)` in f32 on [`Path::active`]; arguments as
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

/// [`gemm`] on a given path, so that tests cover every path on one machine.
///
/// # Panics
/// If this CPU does not support `path` (see [`Path::missing_feature`]), or
/// the slices' lengths do not match the shape.
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
    path.check("gemm");
    assert_eq!(a.len(), m * k, "gemm: a");
    assert_eq!(b.len(), k * n, "gemm: b");
    #[cfg(target_arch = "x86_64")]
    {
        use operand::{Dense, View};
        let dense = |data, ld, round| Dense { data, ld, round };
        // op(a)ᵀ is stored transposed unless `ta`; op(b) is stored as is
        // unless `tb`.
        let ad = dense(a, if ta { m } else { k }, false);
        let bd = dense(b, if tb { k } else { n }, false);
        let (av, bv) = (
            View {
                src: &ad,
                trans: !ta,
            },
            View {
                src: &bd,
                trans: tb,
            },
        );
        match path {
            Path::Scalar => {}
            Path::Avx2 => return block::gemm(&avx2::MICRO, &av, &bv, c, m, k, n),
            Path::Avx512Bf16 if T::BF16 => {
                return block::gemm(&avx512bf16::MICRO, &av, &bv, c, m, k, n)
            }
            Path::Amx if T::BF16 => return block::gemm(&amx::MICRO, &av, &bv, c, m, k, n),
            Path::Avx512 | Path::Avx512Bf16 | Path::Amx => {
                return block::gemm(&avx512::MICRO, &av, &bv, c, m, k, n)
            }
        }
    }
    crate::matmul::matmul(a, b, c, m, k, n, ta, tb)
}

/// `out = a·op(W)` for an NF4 weight on [`Path::active`]; arguments as
/// [`crate::nf4::nf4_matmul`].
pub fn nf4_gemm<T: Elem>(a: &[T], w: &Nf4, m: usize, tb: bool, bf16_compute: bool, out: &mut [T]) {
    nf4_gemm_on(Path::active(), a, w, m, tb, bf16_compute, out)
}

/// [`nf4_gemm`] on a given path. W's panels are dequantized as they are
/// packed (rounded to bf16 in bf16 compute, then multiplied by the bf16
/// dot-product kernel where the path has it).
///
/// # Panics
/// As [`gemm_on`].
pub fn nf4_gemm_on<T: Elem>(
    path: Path,
    a: &[T],
    w: &Nf4,
    m: usize,
    tb: bool,
    bf16_compute: bool,
    out: &mut [T],
) {
    path.check("nf4_gemm");
    // op(W) is [k, n]: Wᵀ (the forward x·Wᵀ) when `tb`.
    let (k, n) = if tb {
        (w.cols, w.rows)
    } else {
        (w.rows, w.cols)
    };
    assert_eq!(a.len(), m * k, "nf4_gemm: a");
    assert_eq!(out.len(), m * n, "nf4_gemm: out");
    #[cfg(target_arch = "x86_64")]
    {
        use operand::{Dense, Nf4Rows, View};
        let ad = Dense {
            data: a,
            ld: k,
            round: bf16_compute,
        };
        let wr = Nf4Rows {
            w,
            round: bf16_compute,
        };
        let (av, wv) = (
            View {
                src: &ad,
                trans: true,
            },
            View {
                src: &wr,
                trans: tb,
            },
        );
        match path {
            Path::Scalar => {}
            Path::Avx2 => return block::gemm(&avx2::MICRO, &av, &wv, out, m, k, n),
            Path::Avx512Bf16 if bf16_compute => {
                return block::gemm(&avx512bf16::MICRO, &av, &wv, out, m, k, n)
            }
            Path::Amx if bf16_compute => return block::gemm(&amx::MICRO, &av, &wv, out, m, k, n),
            Path::Avx512 | Path::Avx512Bf16 | Path::Amx => {
                return block::gemm(&avx512::MICRO, &av, &wv, out, m, k, n)
            }
        }
    }
    crate::nf4::nf4_matmul(a, w, m, tb, bf16_compute, out)
}
