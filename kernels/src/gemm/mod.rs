//! f32 GEMM in the BLIS style: operands packed into panels, cache blocking,
//! a register-tile micro-kernel per instruction set, chosen at run time.
//!
//! `c[m,n] = op(a)·op(b)` with the same meaning of `ta`/`tb` as
//! [`crate::matmul::matmul`], which stays the reference twin and the scalar
//! path. Each output element is summed in one fixed order (its k terms in
//! sequence, with fused multiply-adds on the SIMD paths), whatever the
//! blocking over m and n or the number of threads: a path's results are bit
//! for bit the same run to run and on any thread count. Different paths may
//! differ from each other in the last bits.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod block;
#[cfg(target_arch = "x86_64")]
mod pack;

use std::sync::OnceLock;

/// An implementation of the GEMM, by the instructions it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The reference kernel ([`crate::matmul::matmul`]).
    Scalar,
    /// AVX2 + FMA: a 6×16 register tile.
    Avx2,
    /// AVX-512F: a 14×32 register tile.
    Avx512,
}

impl Path {
    pub const ALL: [Path; 3] = [Path::Scalar, Path::Avx2, Path::Avx512];

    /// The name `GRAFT_CPU` uses.
    pub fn name(self) -> &'static str {
        match self {
            Path::Scalar => "scalar",
            Path::Avx2 => "avx2",
            Path::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Option<Path> {
        Path::ALL.into_iter().find(|p| p.name() == s)
    }

    /// The CPU feature this path needs and this CPU lacks, if any.
    pub fn missing_feature(self) -> Option<&'static str> {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Path::Scalar => None,
                Path::Avx2 if !is_x86_feature_detected!("avx2") => Some("avx2"),
                Path::Avx2 if !is_x86_feature_detected!("fma") => Some("fma"),
                Path::Avx2 => None,
                Path::Avx512 if !is_x86_feature_detected!("avx512f") => Some("avx512f"),
                Path::Avx512 => None,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            match self {
                Path::Scalar => None,
                Path::Avx2 => Some("avx2 (not an x86-64 CPU)"),
                Path::Avx512 => Some("avx512f (not an x86-64 CPU)"),
            }
        }
    }

    pub fn is_supported(self) -> bool {
        self.missing_feature().is_none()
    }

    /// The fastest path this CPU supports.
    pub fn best() -> Path {
        [Path::Avx512, Path::Avx2]
            .into_iter()
            .find(|p| p.is_supported())
            .unwrap_or(Path::Scalar)
    }

    /// The path [`sgemm`] takes: `GRAFT_CPU` if set and supported, else the
    /// best one. Decided once per process (with a one-line notice on stderr
    /// when the choice is not what was asked for or is the slow fallback),
    /// so every matmul of a run, and of a resumed run, takes the same path.
    pub fn active() -> Path {
        static ACTIVE: OnceLock<Path> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            let best = Path::best();
            let forced = std::env::var("GRAFT_CPU").ok().filter(|s| !s.is_empty());
            let chosen = match forced.as_deref().map(|s| (s, Path::parse(s))) {
                None => best,
                Some((_, Some(p))) => match p.missing_feature() {
                    None => p,
                    Some(f) => {
                        eprintln!(
                            "graft: GRAFT_CPU={} needs {f}, which this CPU lacks; using {}",
                            p.name(),
                            best.name()
                        );
                        best
                    }
                },
                Some((s, None)) => {
                    eprintln!(
                        "graft: GRAFT_CPU={s} is not one of scalar, avx2, avx512; using {}",
                        best.name()
                    );
                    best
                }
            };
            if chosen == Path::Scalar && forced.is_none() {
                eprintln!("graft: this CPU has neither AVX-512 nor AVX2+FMA; matmuls take the slow scalar path");
            }
            chosen
        })
    }
}

/// `c[m,n] = op(a)·op(b)` in f32 on [`Path::active`]; arguments as
/// [`crate::matmul::matmul`].
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) {
    sgemm_on(Path::active(), a, b, c, m, k, n, ta, tb)
}

/// [`sgemm`] on a given path, so that tests cover every path on one machine.
///
/// # Panics
/// If this CPU does not support `path` (see [`Path::missing_feature`]), or
/// the slices' lengths do not match the shape.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_on(
    path: Path,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
) {
    if let Some(f) = path.missing_feature() {
        panic!(
            "sgemm: the {} path needs {f}, which this CPU lacks",
            path.name()
        );
    }
    match path {
        Path::Scalar => crate::matmul::matmul(a, b, c, m, k, n, ta, tb),
        #[cfg(target_arch = "x86_64")]
        Path::Avx2 => block::gemm(&avx2::MICRO, a, b, c, m, k, n, ta, tb),
        #[cfg(target_arch = "x86_64")]
        Path::Avx512 => block::gemm(&avx512::MICRO, a, b, c, m, k, n, ta, tb),
        #[cfg(not(target_arch = "x86_64"))]
        Path::Avx2 | Path::Avx512 => unreachable!("refused above"),
    }
}
