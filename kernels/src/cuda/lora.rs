//! Launcher of lora.cu: LoRA's rank-16 A-side product `x·wᵀ` on the tensor
//! cores, an experiment beside cuBLAS (gpu-bench), checked against the
//! CPU's GEMM in kernels/tests/cuda.rs.

use super::{check, driver, int, Gpu, GpuError};
use crate::bf16;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The product's output width (lora.cu's fixed 16).
pub const LORA16_RANK: usize = 16;

pub struct LoraKernels {
    xwt: CudaFunction,
    stream: Arc<CudaStream>,
}

impl LoraKernels {
    pub fn new(gpu: &Gpu) -> Result<LoraKernels, GpuError> {
        let m = gpu.module("lora")?;
        Ok(LoraKernels {
            xwt: m.load_function("lora16_xwt").map_err(driver)?,
            stream: gpu.stream().clone(),
        })
    }

    /// `y[m, 16] = alpha·x[m, k]·w[16, k]ᵀ`, plus `beta·y` where `beta` is
    /// not 0 (then `y` is read): bf16 operands, f32 sums and output. `k`
    /// must be a multiple of 8 (16-byte rows), and `x`, `w` 16-byte aligned
    /// (device allocations and the executor's arena are).
    #[allow(clippy::too_many_arguments)]
    pub fn xwt16(
        &self,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        m: usize,
        k: usize,
        alpha: f32,
        beta: f32,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        if !k.is_multiple_of(8) {
            return Err(GpuError::Shape(format!(
                "lora16 x·wᵀ: k = {k}, the kernel takes multiples of 8"
            )));
        }
        check("lora16 x", x.len(), m * k)?;
        check("lora16 w", w.len(), LORA16_RANK * k)?;
        check("lora16 y", y.len(), m * LORA16_RANK)?;
        if m == 0 {
            return Ok(());
        }
        let (mi, ki) = (int("lora16 rows", m)?, int("lora16 k", k)?);
        let mut l = self.stream.launch_builder(&self.xwt);
        l.arg(x)
            .arg(w)
            .arg(y)
            .arg(&mi)
            .arg(&ki)
            .arg(&alpha)
            .arg(&beta);
        let cfg = LaunchConfig {
            grid_dim: (m.div_ceil(16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel; x holds m rows of k, w 16
        // rows of k (k a multiple of 8: whole 16-byte loads), y m rows of
        // 16; rows past m are neither read nor written.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }
}
