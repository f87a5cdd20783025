//! Launchers of rows.cu: RMSNorm, RoPE and the gated activations on bf16
//! or f32 activations, each checked against the CPU reference in
//! kernels/tests/cuda.rs.

use super::{check, driver, elementwise, int, per_row, DeviceElem, Gpu, GpuError};
use crate::activation::Act;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Each kernel by [`DeviceElem::INDEX`] (f32, bf16).
pub struct RowKernels {
    rms_fwd: [CudaFunction; 2],
    rms_bwd: [CudaFunction; 2],
    rms_inv_rows: [CudaFunction; 2],
    rms_grad_weight: [CudaFunction; 2],
    rope: [CudaFunction; 2],
    act_fwd: [CudaFunction; 2],
    act_bwd: [CudaFunction; 2],
    stream: Arc<CudaStream>,
}

fn kind(a: Act) -> i32 {
    match a {
        Act::Silu => 0,
        Act::GeluTanh => 1,
    }
}

impl RowKernels {
    pub fn new(gpu: &Gpu) -> Result<RowKernels, GpuError> {
        let m = gpu.module("rows")?;
        // The f32 entry point is the bf16 one's name with `_f32`.
        let f = |name: &str| -> Result<[CudaFunction; 2], GpuError> {
            Ok([
                m.load_function(&format!("{name}_f32")).map_err(driver)?,
                m.load_function(name).map_err(driver)?,
            ])
        };
        Ok(RowKernels {
            rms_fwd: f("rms_norm_fwd")?,
            rms_bwd: f("rms_norm_bwd_input")?,
            rms_inv_rows: f("rms_norm_inv_rows")?,
            rms_grad_weight: f("rms_norm_grad_weight")?,
            rope: f("rope")?,
            act_fwd: f("gated_act_fwd")?,
            act_bwd: f("gated_act_bwd")?,
            stream: gpu.stream().clone(),
        })
    }

    /// `y = x·rsqrt(mean(x²)+eps)·g` per row of `x[rows, w.len()]`.
    pub fn rms_norm<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        eps: f32,
        unit_offset: bool,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let h = w.len();
        let rows = x.len() / h.max(1);
        check("rms_norm x", x.len(), rows * h)?;
        check("rms_norm y", y.len(), rows * h)?;
        if rows == 0 {
            return Ok(()); // no rows: a grid of zero blocks is no launch
        }
        let (hi, unit) = (h as i32, unit_offset as i32);
        let mut l = self.stream.launch_builder(&self.rms_fwd[T::INDEX]);
        l.arg(x).arg(w).arg(y).arg(&hi).arg(&eps).arg(&unit);
        // SAFETY: arguments match the kernel; one block per row of checked length.
        unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        Ok(())
    }

    /// The input gradient of [`RowKernels::rms_norm`].
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_grad_input<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        eps: f32,
        unit_offset: bool,
        dx: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let h = w.len();
        let rows = x.len() / h.max(1);
        for (what, len) in [("x", x.len()), ("dy", dy.len()), ("dx", dx.len())] {
            check(&format!("rms_norm_grad_input {what}"), len, rows * h)?;
        }
        if rows == 0 {
            return Ok(());
        }
        let (hi, unit) = (h as i32, unit_offset as i32);
        let mut l = self.stream.launch_builder(&self.rms_bwd[T::INDEX]);
        l.arg(x)
            .arg(w)
            .arg(dy)
            .arg(dx)
            .arg(&hi)
            .arg(&eps)
            .arg(&unit);
        // SAFETY: as for rms_norm.
        unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        Ok(())
    }

    /// The gradient of [`RowKernels::rms_norm`]'s weight, `dw[c] =
    /// Σ_rows dy·x·rsqrt(mean(x²)+eps)` over `x`, `dy` `[rows, dw.len()]`;
    /// `r_rows` (`rows` values) is scratch for each row's factor.
    pub fn rms_norm_grad_weight<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        eps: f32,
        r_rows: &mut CudaSlice<f32>,
        dw: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let h = dw.len();
        let rows = x.len() / h.max(1);
        check("rms_norm_grad_weight x", x.len(), rows * h)?;
        check("rms_norm_grad_weight dy", dy.len(), rows * h)?;
        check("rms_norm_grad_weight scratch", r_rows.len(), rows)?;
        if h == 0 {
            return Ok(());
        }
        let (hi, rows_i) = (
            int("rms_norm_grad_weight width", h)?,
            int("rms_norm_grad_weight rows", rows)?,
        );
        if rows > 0 {
            let mut l = self.stream.launch_builder(&self.rms_inv_rows[T::INDEX]);
            l.arg(x).arg(&mut *r_rows).arg(&hi).arg(&eps);
            // SAFETY: arguments match; one block per row of checked length.
            unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        }
        let mut l = self.stream.launch_builder(&self.rms_grad_weight[T::INDEX]);
        l.arg(x).arg(dy).arg(&*r_rows).arg(dw).arg(&rows_i).arg(&hi);
        let cfg = LaunchConfig {
            grid_dim: (h.div_ceil(32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match; a block per 32 columns of the h checked
        // above (its 8 warps over the rows); with no rows, dw is zeros.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// Half-split RoPE of `x[tokens, n_heads·2·inv_freq.len()]`.
    pub fn rope<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        n_heads: usize,
        inverse: bool,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let (tokens, half) = (positions.len(), inv_freq.len());
        check("rope x", x.len(), tokens * n_heads * 2 * half)?;
        check("rope y", y.len(), x.len())?;
        let (t, h, hf, inv) = (tokens as i32, n_heads as i32, half as i32, inverse as i32);
        let mut l = self.stream.launch_builder(&self.rope[T::INDEX]);
        l.arg(x)
            .arg(positions)
            .arg(inv_freq)
            .arg(y)
            .arg(&t)
            .arg(&h)
            .arg(&hf)
            .arg(&inv);
        // SAFETY: arguments match; the grid-stride loop stays within n.
        unsafe { l.launch(elementwise(tokens * n_heads * half)) }.map_err(driver)?;
        Ok(())
    }

    /// `y = act(gate)·up`.
    pub fn gated_act<T: DeviceElem>(
        &self,
        a: Act,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = gate.len();
        check("gated_act up", up.len(), n)?;
        check("gated_act y", y.len(), n)?;
        let k = kind(a);
        let mut l = self.stream.launch_builder(&self.act_fwd[T::INDEX]);
        l.arg(gate).arg(up).arg(y).arg(&n).arg(&k);
        // SAFETY: arguments match; the grid-stride loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// The gradients of [`RowKernels::gated_act`].
    pub fn gated_act_grad<T: DeviceElem>(
        &self,
        a: Act,
        gate: &CudaSlice<T>,
        up: &CudaSlice<T>,
        dy: &CudaSlice<T>,
        dgate: &mut CudaSlice<T>,
        dup: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = gate.len();
        for (what, len) in [
            ("up", up.len()),
            ("dy", dy.len()),
            ("dgate", dgate.len()),
            ("dup", dup.len()),
        ] {
            check(&format!("gated_act_grad {what}"), len, n)?;
        }
        let k = kind(a);
        let mut l = self.stream.launch_builder(&self.act_bwd[T::INDEX]);
        l.arg(gate)
            .arg(up)
            .arg(dy)
            .arg(dgate)
            .arg(dup)
            .arg(&n)
            .arg(&k);
        // SAFETY: arguments match; the grid-stride loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }
}
