//! Launchers of dora.cu: DoRA's weight norm and its epilogue, checked
//! against [`crate::dora`] in kernels/tests/cuda.rs.

use super::{check, driver, elementwise, DeviceElem, Gpu, GpuError, THREADS};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Output rows per block of the norm kernel (dora.cu's DORA_ROWS).
const ROWS: usize = 8;
/// The largest LoRA rank the norm kernel takes (dora.cu's DORA_MAX_RANK).
pub const DORA_MAX_RANK: usize = 256;

pub struct DoraKernels {
    /// By the weight's type.
    inv_norm: [CudaFunction; 2],
    /// By base's type.
    combine: [CudaFunction; 2],
    stream: Arc<CudaStream>,
}

impl DoraKernels {
    pub fn new(gpu: &Gpu) -> Result<DoraKernels, GpuError> {
        let m = gpu.module("dora")?;
        let f = |name: &str| m.load_function(name).map_err(driver);
        Ok(DoraKernels {
            inv_norm: [f("dora_inv_norm_f32")?, f("dora_inv_norm_bf16")?],
            combine: [f("dora_combine_f32")?, f("dora_combine_bf16")?],
            stream: gpu.stream().clone(),
        })
    }

    /// `y[o] = 1/‖w[o] + s·(b·a)[o]‖₂` with `a [r, in]`, `b [out, r]` and
    /// `w [out, in]` (an NF4 weight dequantized first): the IR's
    /// `dora_inv_norm`.
    pub fn inv_norm<W: DeviceElem>(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        w: &CudaSlice<W>,
        s: f32,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let out = y.len();
        let r = b.len() / out.max(1);
        let inp = a.len() / r.max(1);
        check("dora_inv_norm b", b.len(), out * r)?;
        check("dora_inv_norm a", a.len(), r * inp)?;
        check("dora_inv_norm w", w.len(), out * inp)?;
        if r > DORA_MAX_RANK {
            return Err(GpuError::Shape(format!(
                "dora_inv_norm: rank {r} is over the kernel's {DORA_MAX_RANK}"
            )));
        }
        if out == 0 {
            return Ok(());
        }
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| GpuError::Shape(format!("dora_inv_norm: {v} is over int")))
        };
        let (o, i, rr) = (dim(out)?, dim(inp)?, dim(r)?);
        let mut l = self.stream.launch_builder(&self.inv_norm[W::INDEX]);
        l.arg(a)
            .arg(b)
            .arg(w)
            .arg(&s)
            .arg(&o)
            .arg(&i)
            .arg(&rr)
            .arg(y);
        let cfg = LaunchConfig {
            grid_dim: (out.div_ceil(ROWS) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel and their lengths are checked
        // above; each block reads rows [o0, o0 + 8) ∩ [0, out).
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// `y[m, n] = scale[n]·(base[m, n] + lora[m, n])`, rounded once to T.
    pub fn combine<T: DeviceElem>(
        &self,
        base: &CudaSlice<T>,
        lora: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let (n, cols) = (y.len(), scale.len());
        check("dora_combine base", base.len(), n)?;
        check("dora_combine lora", lora.len(), n)?;
        if cols == 0 || !n.is_multiple_of(cols) {
            return Err(GpuError::Shape(format!(
                "dora_combine: {n} values are not rows of {cols}"
            )));
        }
        let mut l = self.stream.launch_builder(&self.combine[T::INDEX]);
        l.arg(base).arg(lora).arg(scale).arg(y).arg(&n).arg(&cols);
        // SAFETY: arguments match the kernel; the loop stays within n and
        // reads scale at k % cols.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }
}
