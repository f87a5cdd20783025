//! Launchers of elementwise.cu: the glue of a training plan (casts, add,
//! multiply, scales, per-column multiply, sum over rows, fill, dropout) on
//! f32 and bf16, matching [`crate::elementwise`] element for element (the
//! sum over rows adds in another order).

use super::{check, driver, elementwise, Gpu, GpuError, THREADS};
use crate::bf16;
use cudarc::driver::LaunchConfig;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::Arc;

/// An element type the elementwise kernels take: its index in their tables.
pub trait DeviceElem: cudarc::driver::DeviceRepr {
    const INDEX: usize;
}
impl DeviceElem for f32 {
    const INDEX: usize = 0;
}
impl DeviceElem for bf16 {
    const INDEX: usize = 1;
}

/// The kernels of elementwise.cu; each table is indexed by [`DeviceElem::INDEX`].
pub struct ElementwiseKernels {
    add: [CudaFunction; 2],
    mul: [CudaFunction; 2],
    scale: [CudaFunction; 2],
    scale_by: [CudaFunction; 2],
    /// By x's type, then v's.
    mul_cols: [[CudaFunction; 2]; 2],
    sum_rows: [CudaFunction; 2],
    fill: [CudaFunction; 2],
    dropout: [CudaFunction; 2],
    to_bf16: CudaFunction,
    to_f32: CudaFunction,
    stream: Arc<CudaStream>,
}

impl ElementwiseKernels {
    pub fn new(gpu: &Gpu) -> Result<ElementwiseKernels, GpuError> {
        let m = gpu.module("elementwise")?;
        let f = |name: &str| m.load_function(name).map_err(driver);
        let pair = |op: &str| -> Result<[CudaFunction; 2], GpuError> {
            Ok([f(&format!("{op}_f32"))?, f(&format!("{op}_bf16"))?])
        };
        Ok(ElementwiseKernels {
            add: pair("add")?,
            mul: pair("mul")?,
            scale: pair("scale")?,
            scale_by: pair("scale_by")?,
            mul_cols: [pair("mul_cols_f32")?, pair("mul_cols_bf16")?],
            sum_rows: pair("sum_rows")?,
            fill: pair("fill")?,
            dropout: pair("dropout")?,
            to_bf16: f("cast_f32_bf16")?,
            to_f32: f("cast_bf16_f32")?,
            stream: gpu.stream().clone(),
        })
    }

    /// `y = a + b`.
    pub fn add<T: DeviceElem>(
        &self,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        self.binary(&self.add[T::INDEX], "add", a, b, y)
    }

    /// `y = a·b`.
    pub fn mul<T: DeviceElem>(
        &self,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        self.binary(&self.mul[T::INDEX], "mul", a, b, y)
    }

    fn binary<T: DeviceElem>(
        &self,
        f: &CudaFunction,
        what: &str,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = y.len();
        check(&format!("{what} a"), a.len(), n)?;
        check(&format!("{what} b"), b.len(), n)?;
        let mut l = self.stream.launch_builder(f);
        l.arg(a).arg(b).arg(y).arg(&n);
        // SAFETY: arguments match the kernel; the loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `y = x·c`.
    pub fn scale<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        c: f32,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = y.len();
        check("scale x", x.len(), n)?;
        let mut l = self.stream.launch_builder(&self.scale[T::INDEX]);
        l.arg(x).arg(&c).arg(y).arg(&n);
        // SAFETY: as in binary.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `y[m, c] = x[m, c]·v[c]` over rows of `v.len()`; `y` may be `x`
    /// (pass the same window through [`super::Gpu::borrow`] twice).
    pub fn mul_cols<T: DeviceElem, V: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        v: &CudaSlice<V>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let (n, cols) = (y.len(), v.len());
        check("mul_cols x", x.len(), n)?;
        if cols == 0 || !n.is_multiple_of(cols) {
            return Err(GpuError::Shape(format!(
                "mul_cols: {n} values are not rows of {cols}"
            )));
        }
        let mut l = self
            .stream
            .launch_builder(&self.mul_cols[T::INDEX][V::INDEX]);
        l.arg(x).arg(v).arg(y).arg(&n).arg(&cols);
        // SAFETY: as in binary; v is read at k % cols.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `y[c] = Σ_m x[m, c]` (f32 sums) over rows of `y.len()`.
    pub fn sum_rows<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let cols = y.len();
        let rows = x.len() / cols.max(1);
        check("sum_rows x", x.len(), rows * cols)?;
        if cols == 0 {
            return Ok(());
        }
        let dim = |v: usize| {
            i32::try_from(v).map_err(|_| GpuError::Shape(format!("sum_rows: {v} is over int")))
        };
        let (r, c) = (dim(rows)?, dim(cols)?);
        let mut l = self.stream.launch_builder(&self.sum_rows[T::INDEX]);
        l.arg(x).arg(y).arg(&r).arg(&c);
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(32) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel; one block per 32 columns, each
        // guarded by c < cols.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        Ok(())
    }

    /// `y = x·s[0]`.
    pub fn scale_by<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        s: &CudaSlice<f32>,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = y.len();
        check("scale_by x", x.len(), n)?;
        check("scale_by s", s.len(), 1)?;
        let mut l = self.stream.launch_builder(&self.scale_by[T::INDEX]);
        l.arg(x).arg(s).arg(y).arg(&n);
        // SAFETY: as in binary.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    pub fn fill<T: DeviceElem>(&self, y: &mut CudaSlice<T>, value: f32) -> Result<(), GpuError> {
        let n = y.len();
        let mut l = self.stream.launch_builder(&self.fill[T::INDEX]);
        l.arg(y).arg(&value).arg(&n);
        // SAFETY: as in binary.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `y = x·mask/(1-p)` with [`crate::elementwise::dropout_keep`]'s mask
    /// for the seed `seed[0]`.
    pub fn dropout<T: DeviceElem>(
        &self,
        x: &CudaSlice<T>,
        seed: &CudaSlice<u32>,
        p: f32,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let n = y.len();
        check("dropout x", x.len(), n)?;
        check("dropout seed", seed.len(), 1)?;
        let mut l = self.stream.launch_builder(&self.dropout[T::INDEX]);
        l.arg(x).arg(seed).arg(&p).arg(y).arg(&n);
        // SAFETY: as in binary.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// f32 to bf16, rounded to nearest even.
    pub fn to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<bf16>) -> Result<(), GpuError> {
        let n = y.len();
        check("cast x", x.len(), n)?;
        let mut l = self.stream.launch_builder(&self.to_bf16);
        l.arg(x).arg(y).arg(&n);
        // SAFETY: as in binary.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    pub fn to_f32(&self, x: &CudaSlice<bf16>, y: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n = y.len();
        check("cast x", x.len(), n)?;
        let mut l = self.stream.launch_builder(&self.to_f32);
        l.arg(x).arg(y).arg(&n);
        // SAFETY: as in binary.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }
}
