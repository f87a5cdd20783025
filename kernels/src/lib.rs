//! graft-kernels: compute kernels as plain functions over slices.
//!
//! Every kernel here is the reference implementation: straightforward,
//! parallel with rayon where it pays, generic over the storage type with f32
//! compute and accumulation. Faster versions (SIMD, fused) take the same
//! signatures and are chosen by runtime CPU-feature dispatch inside these
//! public functions; the reference stays as their test twin.

pub mod activation;
pub mod attention;
pub mod cache;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dora;
pub mod elementwise;
pub mod embedding;
pub mod gemm;
pub mod loss;
pub mod math;
pub mod matmul;
pub mod nf4;
pub mod norm;
pub mod rope;
pub mod simd;
pub mod update;

pub use half::{bf16, f16};

/// A storage type the kernels read and write; arithmetic happens in f32.
pub trait Elem: Copy + Send + Sync + 'static {
    /// bf16 values, which the bf16 dot-product kernels multiply exactly.
    const BF16: bool = false;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The bits of the value rounded to bf16 (round to nearest even).
    #[inline(always)]
    fn to_bf16_bits(self) -> u16 {
        bf16_bits(self.to_f32())
    }
    /// The slice as f32, when it is one: kernels that accumulate in f32
    /// write such outputs in place instead of through a buffer.
    fn as_f32_mut(_s: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    /// The slice as a GEMM operand.
    fn operand(s: &[Self]) -> gemm::Operand<'_>;
}

impl Elem for f32 {
    fn operand(s: &[f32]) -> gemm::Operand<'_> {
        gemm::Operand::F32(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for bf16 {
    const BF16: bool = true;
    fn operand(s: &[bf16]) -> gemm::Operand<'_> {
        gemm::Operand::Bf16(s)
    }
    #[inline(always)]
    fn to_bf16_bits(self) -> u16 {
        self.to_bits()
    }
    /// The bits shifted into place: `half`'s conversion also quiets a
    /// signalling NaN, a branch that cost 5% of a training step in the
    /// loops that widen bf16 (a NaN stays a NaN either way).
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_bits(bf16_bits(x))
    }
}

impl Elem for f16 {
    fn operand(s: &[f16]) -> gemm::Operand<'_> {
        gemm::Operand::F16(s)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

/// `x` rounded to bf16 (to nearest, ties to even; NaN stays a quiet NaN),
/// as bits: the same result as `half::bf16::from_f32`, written without
/// branches on the value so that loops over slices vectorize (the
/// conversion of every bf16 output went through the scalar one).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x40;
    (if x.is_nan() { nan } else { rounded }) as u16
}

/// An index input (token id, label) outside its valid range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value} at position {position} is out of range 0..{limit}")]
pub struct IndexError {
    pub what: &'static str,
    pub position: usize,
    pub value: i64,
    pub limit: usize,
}

/// Rows below this many elements of work are not worth a rayon task.
pub(crate) const PAR_MIN_WORK: usize = 1 << 14;
