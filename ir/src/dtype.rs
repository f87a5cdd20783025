//! Element types of graph values, and the byte layout of packed NF4.

use std::fmt;
use std::ops::Range;

/// The storage type of a value. Compute and accumulation happen in f32 in the
/// reference kernels whatever the storage type; faster backends record their
/// own choice per op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    U32,
    /// Raw bytes (the parts of quantized checkpoints).
    U8,
    /// bitsandbytes NF4 with double quantization, `block` values per absmax
    /// (see [`Nf4Layout`]). Only weights have it; only NF4 ops read it.
    Nf4 {
        block: u32,
    },
}

impl DType {
    /// Bytes of `numel` elements.
    pub fn bytes(self, numel: usize) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4 * numel,
            DType::BF16 | DType::F16 => 2 * numel,
            DType::U8 => numel,
            DType::Nf4 { block } => Nf4Layout::new(numel, block as usize).total,
        }
    }

    /// The alignment the bytes need to be read in place.
    pub fn align(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
            _ => 4,
        }
    }

    pub fn is_nf4(self) -> bool {
        matches!(self, DType::Nf4 { .. })
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U32 => "u32",
            DType::U8 => "u8",
            DType::Nf4 { .. } => "nf4",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DType::Nf4 { block } => write!(f, "nf4(block {block})"),
            _ => f.write_str(self.name()),
        }
    }
}

/// Values per nested (double-quantization) block: bitsandbytes' fixed 256.
pub const NF4_NESTED_BLOCK: usize = 256;

/// Where each part of an NF4 tensor lies in its bytes. f32 parts come first,
/// so a 4-aligned tensor reads them in place:
/// `[nested map: 256 f32][offset: f32][nested scales: f32 per 256 blocks]
///  [absmax codes: u8 per block][packed codes: two per byte, even index high]`.
/// Dequantization: `absmax[b] = map[code[b]]·scale[b/256] + offset`, then
/// `w[i] = NF4[q[i]]·absmax[i/block]`, over the row-major flattened weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nf4Layout {
    pub numel: usize,
    pub block: usize,
    pub blocks: usize,
    pub nested_blocks: usize,
    pub nested_map: Range<usize>,
    pub offset: usize,
    pub nested_scales: Range<usize>,
    pub absmax: Range<usize>,
    pub packed: Range<usize>,
    pub total: usize,
}

impl Nf4Layout {
    pub fn new(numel: usize, block: usize) -> Self {
        let blocks = numel.div_ceil(block.max(1));
        let nested_blocks = blocks.div_ceil(NF4_NESTED_BLOCK);
        let nested_map = 0..4 * 256;
        let offset = nested_map.end;
        let nested_scales = offset + 4..offset + 4 + 4 * nested_blocks;
        let absmax = nested_scales.end..nested_scales.end + blocks;
        let packed = absmax.end..absmax.end + numel.div_ceil(2);
        let total = packed.end;
        Nf4Layout {
            numel,
            block,
            blocks,
            nested_blocks,
            nested_map,
            offset,
            nested_scales,
            absmax,
            packed,
            total,
        }
    }

    /// Bits of storage per weight, everything included (the nested map too).
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.total as f64 / self.numel as f64
    }
}
