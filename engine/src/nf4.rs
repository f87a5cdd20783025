//! NF4 tensors: built from bitsandbytes' parts, read as kernel views. The
//! byte layout is the IR's [`Nf4Layout`].

use crate::{EngineError, Tensor};
use graft_ir::{DType, Nf4Layout};
use graft_kernels::nf4::{Nf4, Nf4Parts};
use graft_kernels::{bf16, f16};

impl Tensor {
    /// Assembles an NF4 tensor, checking every part's length against the
    /// shape and block size.
    pub fn from_nf4(shape: &[usize], p: &Nf4Parts) -> Result<Tensor, EngineError> {
        let numel: usize = shape.iter().product();
        let l = Nf4Layout::new(numel, p.block);
        let check = |what: &str, got: usize, want: usize| {
            if got != want {
                return Err(EngineError::Tensor(format!(
                    "nf4 {what} has {got} entries; shape {shape:?} with block {} needs {want}",
                    p.block
                )));
            }
            Ok(())
        };
        check("packed data", p.packed.len(), l.packed.len())?;
        check("absmax", p.absmax.len(), l.blocks)?;
        check("nested absmax", p.nested_scales.len(), l.nested_blocks)?;
        check("nested quant map", p.nested_map.len(), 256)?;
        let mut bytes = vec![0u8; l.total];
        bytes[l.nested_map.clone()].copy_from_slice(bytemuck::cast_slice(&p.nested_map));
        bytes[l.offset..l.offset + 4].copy_from_slice(&p.offset.to_le_bytes());
        bytes[l.nested_scales.clone()].copy_from_slice(bytemuck::cast_slice(&p.nested_scales));
        bytes[l.absmax.clone()].copy_from_slice(&p.absmax);
        bytes[l.packed.clone()].copy_from_slice(&p.packed);
        Tensor::from_bytes(
            shape,
            DType::Nf4 {
                block: p.block as u32,
            },
            &bytes,
        )
    }

    /// Quantizes a float tensor to NF4 (bit-exact with bitsandbytes).
    pub fn quantize_nf4(&self, block: usize) -> Result<Tensor, EngineError> {
        use graft_kernels::nf4::quantize;
        let b = self.bytes();
        let parts = match self.dtype() {
            DType::F32 => quantize(bytemuck::cast_slice::<u8, f32>(b), block),
            DType::BF16 => quantize(bytemuck::cast_slice::<u8, bf16>(b), block),
            DType::F16 => quantize(bytemuck::cast_slice::<u8, f16>(b), block),
            other => {
                return Err(EngineError::Tensor(format!(
                    "cannot quantize a {other} tensor to nf4"
                )))
            }
        }
        .map_err(|e| EngineError::Tensor(format!("cannot quantize to nf4: {e}")))?;
        Tensor::from_nf4(self.shape(), &parts)
    }

    /// The kernel view of a 2-D NF4 tensor.
    pub fn nf4(&self) -> Result<Nf4<'_>, EngineError> {
        let DType::Nf4 { block } = self.dtype() else {
            return Err(EngineError::Tensor(format!(
                "expected an nf4 tensor, got {}",
                self.dtype()
            )));
        };
        nf4_view(self.bytes(), self.shape(), block as usize)
    }
}

/// Reads NF4 bytes laid out as [`Nf4Layout`] (4-aligned) as a kernel view;
/// a 1-D shape is one row.
pub(crate) fn nf4_view<'a>(
    bytes: &'a [u8],
    shape: &[usize],
    block: usize,
) -> Result<Nf4<'a>, EngineError> {
    let (rows, cols) = match shape {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        other => {
            return Err(EngineError::Tensor(format!(
                "nf4 tensors are 1-D or 2-D, got shape {other:?}"
            )))
        }
    };
    let l = Nf4Layout::new(rows * cols, block);
    if bytes.len() != l.total {
        return Err(EngineError::Tensor(format!(
            "nf4 bytes: {} but the layout needs {}",
            bytes.len(),
            l.total
        )));
    }
    let f32s = |r: std::ops::Range<usize>| -> Result<&'a [f32], EngineError> {
        bytemuck::try_cast_slice(&bytes[r])
            .map_err(|e| EngineError::Tensor(format!("nf4 bytes misaligned: {e}")))
    };
    Ok(Nf4 {
        rows,
        cols,
        block,
        packed: &bytes[l.packed.clone()],
        absmax: &bytes[l.absmax.clone()],
        nested_scales: f32s(l.nested_scales.clone())?,
        nested_map: f32s(l.nested_map.clone())?,
        offset: f32s(l.offset..l.offset + 4)?[0],
    })
}
