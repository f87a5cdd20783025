//! NF4 (bitsandbytes' 4-bit NormalFloat with double quantization):
//! dequantization and products with a frozen NF4 weight that dequantize tile
//! by tile, so the whole dequantized weight never exists.

mod decode;

use crate::{bf16, Elem};
use rayon::prelude::*;

/// The 16 NF4 code values, index order (as bitsandbytes).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' `create_dynamic_map(signed=True)` (the 8-bit map of the
/// nested absmax quantization), as f32 bit patterns taken from the package.
pub const DYNAMIC_MAP_SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed dynamic map as f32.
pub fn dynamic_map_signed() -> [f32; 256] {
    DYNAMIC_MAP_SIGNED_BITS.map(f32::from_bits)
}

/// The parts of an NF4 tensor, as bitsandbytes stores them (row-major,
/// flattened; shape kept by the owner).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Parts {
    pub block: usize,
    pub packed: Vec<u8>,
    pub absmax: Vec<u8>,
    pub nested_scales: Vec<f32>,
    pub offset: f32,
    pub nested_map: Vec<f32>,
}

impl Nf4Parts {
    /// The kernel view of these parts as a `rows × cols` weight.
    pub fn view(&self, rows: usize, cols: usize) -> Nf4<'_> {
        Nf4 {
            rows,
            cols,
            block: self.block,
            packed: &self.packed,
            absmax: &self.absmax,
            nested_scales: &self.nested_scales,
            nested_map: &self.nested_map,
            offset: self.offset,
        }
    }
}

/// Why a tensor cannot be quantized.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("value {value} at flat index {index} is not finite")]
    NonFinite { index: usize, value: f32 },
    #[error("block size {0} is not supported (32, 64, ..., 4096)")]
    Block(usize),
    #[error("cannot quantize an empty tensor")]
    Empty,
}

/// Fails unless `block` is a block size [`quantize`] takes.
pub fn check_block(block: usize) -> Result<(), QuantizeError> {
    match block.is_power_of_two() && (32..=4096).contains(&block) {
        true => Ok(()),
        false => Err(QuantizeError::Block(block)),
    }
}

/// Midpoints between consecutive NF4 code values.
const NF4_MID: [f32; 15] = {
    let mut mid = [0f32; 15];
    let mut i = 0;
    while i < 15 {
        mid[i] = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        i += 1;
    }
    mid
};

/// The code of a scaled value: `torch.bucketize(right=False)`, the number
/// of midpoints strictly below; a value on a midpoint takes the lower code.
/// Counted without branches, so a loop over values vectorizes.
#[inline(always)]
fn nf4_code(s: f32) -> u8 {
    NF4_MID.iter().map(|&m| (m < s) as u8).sum()
}

/// Blocks per parallel run of the quantizer.
const RUN_BLOCKS: usize = 1024;

/// Quantizes `x` (a row-major flattened weight, f32, bf16 or f16, read as
/// f32) to NF4 with double quantization, bit for bit as bitsandbytes 0.50
/// does on the CPU (`quantize_4bit(quant_type="nf4", compress_statistics=True)`);
/// the script `tests/oracle/make_nf4_fixtures.py` holds the spec this
/// follows. Reads `x` where it lies (a memory-mapped checkpoint's bf16) and
/// writes the packed codes in place: nothing of `x`'s size is allocated but
/// the half-size result.
pub fn quantize<T: Elem>(x: &[T], block: usize) -> Result<Nf4Parts, QuantizeError> {
    check_block(block)?;
    if x.is_empty() {
        return Err(QuantizeError::Empty);
    }
    check_finite(x)?;
    // Blocks are independent: runs of them in parallel (a 7B model's
    // weights are quantized as they load), each writing its own bytes.
    let run = block * RUN_BLOCKS;
    let mut packed = vec![0u8; x.len().div_ceil(2)];
    let mut absmax = vec![0f32; x.len().div_ceil(block)];
    packed
        .par_chunks_mut(run / 2)
        .zip(absmax.par_chunks_mut(RUN_BLOCKS))
        .zip(x.par_chunks(run))
        .for_each(|((packed, absmax), x)| {
            crate::simd::vectorized(
                #[inline(always)]
                || quantize_run(x, block, packed, absmax),
            )
        });
    let offset = torch_mean(&absmax);
    let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (absmax_codes, nested_scales) = quantize_nested(&centered);
    Ok(Nf4Parts {
        block,
        packed,
        absmax: absmax_codes,
        nested_scales,
        offset,
        nested_map: dynamic_map_signed().to_vec(),
    })
}

/// The first value that is not finite, as an error.
fn check_finite<T: Elem>(x: &[T]) -> Result<(), QuantizeError> {
    // Chunks flagged in parallel without early exit (so each vectorizes),
    // then the first bad index found in the first bad chunk.
    const CHUNK: usize = 1 << 16;
    let bad = x.par_chunks(CHUNK).position_first(|c| {
        crate::simd::vectorized(
            #[inline(always)]
            || c.iter().fold(false, |b, v| b | !v.to_f32().is_finite()),
        )
    });
    match bad {
        None => Ok(()),
        Some(c) => {
            let chunk = &x[c * CHUNK..];
            let i = chunk
                .iter()
                .position(|v| !v.to_f32().is_finite())
                .unwrap_or(0);
            Err(QuantizeError::NonFinite {
                index: c * CHUNK + i,
                value: chunk[i].to_f32(),
            })
        }
    }
}

/// Quantizes the blocks of `x` into `packed` (two codes a byte, the even
/// element high; an odd last element paired with the code of 0.0) and their
/// absmax into `absmax`.
#[inline(always)]
fn quantize_run<T: Elem>(x: &[T], block: usize, packed: &mut [u8], absmax: &mut [f32]) {
    for ((chunk, bytes), am_out) in x
        .chunks(block)
        .zip(packed.chunks_mut(block / 2))
        .zip(absmax.iter_mut())
    {
        let am = chunk.iter().fold(0f32, |a, v| a.max(v.to_f32().abs()));
        // Full blocks multiply by the reciprocal and keep the absmax as is;
        // the partial last block divides, and keeps the clamped absmax.
        let full = chunk.len() == block;
        let am = if full { am } else { am.max(ABSMAX_MIN) };
        let inv = 1.0 / am.max(ABSMAX_MIN);
        let code = |v: &T| {
            let v = v.to_f32();
            nf4_code(if full { v * inv } else { v / am }.clamp(-1.0, 1.0))
        };
        let pairs = chunk.chunks_exact(2);
        let last = pairs.remainder().first();
        for (b, p) in bytes.iter_mut().zip(pairs) {
            *b = (code(&p[0]) << 4) | code(&p[1]);
        }
        if let Some(v) = last {
            bytes[chunk.len() / 2] = (code(v) << 4) | nf4_code(0.0);
        }
        *am_out = am;
    }
}

/// `clamp(min=1e-38)` in f32: a subnormal.
const ABSMAX_MIN: f32 = 1e-38;

/// bitsandbytes' native CPU `quantize_blockwise` with the signed dynamic map
/// over blocks of 256: a 65536-cell lookup of the scaled value, which is not
/// always the nearest code.
fn quantize_nested(a: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let lut = nested_lut();
    let mut q = vec![0u8; a.len()];
    let mut scales = Vec::with_capacity(a.len().div_ceil(256));
    for (qb, ab) in q.chunks_mut(256).zip(a.chunks(256)) {
        let am = ab
            .iter()
            .fold(
                f32::NEG_INFINITY,
                |m, v| if m < v.abs() { v.abs() } else { m },
            )
            .max(0.0);
        scales.push(am);
        if am == 0.0 {
            continue;
        }
        let inv = 1.0 / am;
        for (q, v) in qb.iter_mut().zip(ab) {
            let t = ((v * inv).clamp(-1.0, 1.0) + 1.0) * 0.5;
            *q = lut[(t.mul_add(65535.0, 0.5) as u32 & 0xFFFF) as usize];
        }
    }
    (q, scales)
}

/// Cell `i` of [-1, 1] split into 65536 maps to the first dynamic-map code
/// whose upper midpoint is at or above the cell's value.
fn nested_lut() -> &'static [u8] {
    static LUT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LUT.get_or_init(|| {
        let code = dynamic_map_signed();
        let mid: Vec<f32> = code.windows(2).map(|c| (c[0] + c[1]) * 0.5).collect();
        let mut idx = 0;
        (0..65536u32)
            .map(|i| {
                let val = (2 * i) as f32 / 65535.0 - 1.0;
                while idx < 255 && mid[idx] < val {
                    idx += 1;
                }
                idx as u8
            })
            .collect()
    })
}

/// `Tensor.mean()` of a 1-D f32 CPU tensor as torch computes it on one
/// thread: ATen's cascade sum over 8-lane vectors, then one division. (Above
/// 32768 values torch splits the sum across threads, and its result then
/// depends on the thread count; this follows the single-thread order.)
pub fn torch_mean(x: &[f32]) -> f32 {
    torch_sum(x) / x.len() as f32
}

// Indexed loops kept: they mirror ATen's loops line by line, which is what
// makes the order of the additions (and so the bits) checkable.
#[allow(clippy::needless_range_loop)]
fn torch_sum(x: &[f32]) -> f32 {
    type V = [f32; 8];
    let n = x.len();
    let lanes = if n >= 8 { 8 } else { 1 };
    let nvec = n / lanes;
    let load = |i: usize| -> V {
        let mut v = [0f32; 8];
        v[..lanes].copy_from_slice(&x[i * lanes..(i + 1) * lanes]);
        v
    };
    let add = |a: V, b: V| -> V { std::array::from_fn(|l| a[l] + b[l]) };
    let zero = [0f32; 8];
    // Four interleaved rows of vectors, summed in levels (ATen's multi_row_sum).
    let size = nvec / 4;
    let ceil_log2 = if size > 1 {
        (usize::BITS - (size - 1).leading_zeros()) as usize
    } else {
        0
    };
    let level_power = (ceil_log2 / 4).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[zero; 4]; 4];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..4 {
                acc[0][k] = add(acc[0][k], load(i * 4 + k));
            }
            i += 1;
        }
        for j in 1..4 {
            for k in 0..4 {
                acc[j][k] = add(acc[j][k], acc[j - 1][k]);
                acc[j - 1][k] = zero;
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..4 {
            acc[0][k] = add(acc[0][k], load(i * 4 + k));
        }
        i += 1;
    }
    for j in 1..4 {
        for k in 0..4 {
            acc[0][k] = add(acc[0][k], acc[j][k]);
        }
    }
    let mut part = acc[0];
    for v in size * 4..nvec {
        part[0] = add(part[0], load(v));
    }
    for k in 1..4 {
        part[0] = add(part[0], part[k]);
    }
    if lanes == 1 {
        return 0.0 + part[0][0];
    }
    // The scalar tail first, then the lanes in order.
    let mut total = x[nvec * lanes..].iter().fold(0f32, |s, v| s + v);
    for l in 0..lanes {
        total += part[0][l];
    }
    0.0 + total
}

/// A borrowed NF4 weight of `rows × cols` values (row-major, flattened into
/// blocks of `block` values).
#[derive(Clone, Copy, Debug)]
pub struct Nf4<'a> {
    pub rows: usize,
    pub cols: usize,
    pub block: usize,
    /// Two codes per byte, the even index in the high nibble.
    pub packed: &'a [u8],
    /// One 8-bit code per block, into `nested_map`.
    pub absmax: &'a [u8],
    /// One f32 scale per 256 blocks.
    pub nested_scales: &'a [f32],
    pub nested_map: &'a [f32],
    pub offset: f32,
}

impl Nf4<'_> {
    /// The f32 absmax of block `b`: `map[code]·scale + offset`, in that order.
    #[inline]
    pub fn block_absmax(&self, b: usize) -> f32 {
        self.nested_map[self.absmax[b] as usize] * self.nested_scales[b / 256] + self.offset
    }

    /// The 4-bit code of flat element `i`.
    #[inline]
    pub fn code(&self, i: usize) -> usize {
        let byte = self.packed[i / 2];
        (if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0xF
        }) as usize
    }

    /// Dequantizes the flat elements `start..start+out.len()` into `out`.
    #[inline(always)]
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        self.dequantize_as(start, out);
    }

    /// The same values rounded to bf16 (as bits): what a bf16-compute
    /// product multiplies.
    #[inline(always)]
    pub fn dequantize_bf16_into(&self, start: usize, out: &mut [u16]) {
        self.dequantize_as(start, out);
    }

    /// Dequantizes block by block: whole bytes through
    /// [`decode::decode`] with the block's absmax, a lone code at either
    /// end through the block's table.
    #[inline(always)]
    fn dequantize_as<V: decode::Decoded>(&self, start: usize, out: &mut [V]) {
        let end = start + out.len();
        let (mut i, mut o) = (start, 0);
        while i < end {
            let b = i / self.block;
            let block_end = ((b + 1) * self.block).min(end);
            let a = self.block_absmax(b);
            if i % 2 == 1 {
                out[o] = V::table(a)[self.code(i)];
                (i, o) = (i + 1, o + 1);
            }
            // Whole bytes: two codes each, the even element high.
            let pairs = (block_end.saturating_sub(i)) / 2;
            let bytes = &self.packed[i / 2..][..pairs];
            decode::decode(a, bytes, &mut out[o..o + 2 * pairs]);
            (i, o) = (i + 2 * pairs, o + 2 * pairs);
            if i < block_end {
                out[o] = V::table(a)[self.code(i)];
                (i, o) = (i + 1, o + 1);
            }
        }
    }
}

/// Rows of W dequantized per task in the forward product.
const TILE_ROWS: usize = 16;
/// Columns of W dequantized per task in the input-gradient product.
const TILE_COLS: usize = 32;

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct Out<T>(*mut T);
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}
impl<T> Out<T> {
    /// Through a method, so closures capture the whole (Sync) wrapper.
    fn at(&self, i: usize) -> *mut T {
        // SAFETY: callers stay within the output slice.
        unsafe { self.0.add(i) }
    }
}

fn round_to(x: f32, bf16_compute: bool) -> f32 {
    if bf16_compute {
        bf16::from_f32(x).to_f32()
    } else {
        x
    }
}

/// `out = a·op(W)` with W dequantized tile by tile: `a[m, cols]·Wᵀ` giving
/// `[m, rows]` when `tb`, else `a[m, rows]·W` giving `[m, cols]`. Operands are
/// rounded to bf16 when `bf16_compute`; accumulation is f32.
pub fn nf4_matmul<T: Elem>(
    a: &[T],
    w: &Nf4,
    m: usize,
    tb: bool,
    bf16_compute: bool,
    out: &mut [T],
) {
    let (n, k) = (w.rows, w.cols);
    let (inner, outer) = if tb { (k, n) } else { (n, k) };
    assert_eq!(a.len(), m * inner, "nf4_matmul: a");
    assert_eq!(out.len(), m * outer, "nf4_matmul: out");
    let a32: Vec<f32> = a
        .iter()
        .map(|v| round_to(v.to_f32(), bf16_compute))
        .collect();
    let dst = Out(out.as_mut_ptr());
    if tb {
        // Each task dequantizes TILE_ROWS rows of W and fills those output columns.
        (0..n.div_ceil(TILE_ROWS)).into_par_iter().for_each(|t| {
            let (r0, r1) = (t * TILE_ROWS, ((t + 1) * TILE_ROWS).min(n));
            let mut tile = vec![0f32; (r1 - r0) * k];
            w.dequantize_into(r0 * k, &mut tile);
            tile.iter_mut()
                .for_each(|v| *v = round_to(*v, bf16_compute));
            for i in 0..m {
                let a_row = &a32[i * k..(i + 1) * k];
                for (j, w_row) in tile.chunks(k).enumerate() {
                    let dot: f32 = a_row.iter().zip(w_row).map(|(x, y)| x * y).sum();
                    // SAFETY: task t alone writes columns r0..r1 of every row.
                    unsafe { *dst.at(i * n + r0 + j) = T::from_f32(dot) };
                }
            }
        });
    } else {
        // Each task dequantizes a slab of TILE_COLS columns of W and fills
        // those output columns.
        (0..k.div_ceil(TILE_COLS)).into_par_iter().for_each(|t| {
            let (c0, c1) = (t * TILE_COLS, ((t + 1) * TILE_COLS).min(k));
            let width = c1 - c0;
            let mut slab = vec![0f32; n * width];
            for (r, row) in slab.chunks_mut(width).enumerate() {
                w.dequantize_into(r * k + c0, row);
                row.iter_mut().for_each(|v| *v = round_to(*v, bf16_compute));
            }
            let mut acc = vec![0f32; width];
            for i in 0..m {
                acc.fill(0.0);
                for (r, row) in slab.chunks(width).enumerate() {
                    let av = a32[i * n + r];
                    for (s, v) in acc.iter_mut().zip(row) {
                        *s += av * v;
                    }
                }
                for (c, s) in acc.iter().enumerate() {
                    // SAFETY: task t alone writes columns c0..c1 of every row.
                    unsafe { *dst.at(i * k + c0 + c) = T::from_f32(*s) };
                }
            }
        });
    }
}
