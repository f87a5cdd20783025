//! DoRA's pieces that need the base weights: the magnitude's initial value
//! (the row norms of W, dequantized row by row for an NF4 base).

use crate::lora::Lora;
use crate::{CausalLm, ModelError};
use graft_engine::ir::DType;
use graft_engine::Tensor;

/// Row norms `‖W_o + s·(B·A)_o‖` of `w` (dense or NF4), one row at a time.
pub fn row_norms(
    w: &Tensor,
    a: &[f32],
    b: &[f32],
    r: usize,
    s: f32,
) -> Result<Vec<f32>, ModelError> {
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    let mut y = vec![0f32; out];
    match w.dtype() {
        DType::Nf4 { .. } => {
            let v = w.nf4()?;
            graft_engine::kernels::dora::dora_norms(
                |o, buf| v.dequantize_into(o * inp, buf),
                a,
                b,
                r,
                s,
                &mut y,
            );
        }
        _ => {
            let dense = w.to_f32_vec()?;
            graft_engine::kernels::dora::dora_norms(
                |o, buf| buf.copy_from_slice(&dense[o * inp..(o + 1) * inp]),
                a,
                b,
                r,
                s,
                &mut y,
            );
        }
    }
    Ok(y)
}

impl Lora {
    /// Sets each module's DoRA magnitude to the row norms of `W + s·B·A`
    /// (of W itself for a fresh adapter, B being zero), as PEFT initialises it.
    pub fn init_magnitudes(&mut self, model: &CausalLm) -> Result<(), ModelError> {
        let s = self.config.scaling();
        for m in &mut self.modules {
            let name = format!("{}.weight", m.path);
            let w = model
                .weight(&name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.clone(),
                    dir: model.dir.clone(),
                })?;
            let norms = row_norms(w, m.a.as_f32()?, m.b.as_f32()?, m.a.shape()[0], s)?;
            m.magnitude = Some(Tensor::from_f32(&[norms.len()], &norms)?);
        }
        Ok(())
    }
}
