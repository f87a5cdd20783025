//! Launchers of elementwise.cu: the glue of a training plan (casts, add,
//! scale by a device scalar, fill, dropout) on f32 and bf16, matching
//! [`crate::elementwise`] element for element.

use super::{check, driver, elementwise, Gpu, GpuError};
use crate::bf16;
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
    scale: [CudaFunction; 2],
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
            scale: pair("scale")?,
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
        let n = y.len();
        check("add a", a.len(), n)?;
        check("add b", b.len(), n)?;
        let mut l = self.stream.launch_builder(&self.add[T::INDEX]);
        l.arg(a).arg(b).arg(y).arg(&n);
        // SAFETY: arguments match the kernel; the loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
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
        let mut l = self.stream.launch_builder(&self.scale[T::INDEX]);
        l.arg(x).arg(s).arg(y).arg(&n);
        // SAFETY: as in add.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    pub fn fill<T: DeviceElem>(&self, y: &mut CudaSlice<T>, value: f32) -> Result<(), GpuError> {
        let n = y.len();
        let mut l = self.stream.launch_builder(&self.fill[T::INDEX]);
        l.arg(y).arg(&value).arg(&n);
        // SAFETY: as in add.
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
        // SAFETY: as in add.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// f32 to bf16, rounded to nearest even.
    pub fn to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<bf16>) -> Result<(), GpuError> {
        let n = y.len();
        check("cast x", x.len(), n)?;
        let mut l = self.stream.launch_builder(&self.to_bf16);
        l.arg(x).arg(y).arg(&n);
        // SAFETY: as in add.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    pub fn to_f32(&self, x: &CudaSlice<bf16>, y: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n = y.len();
        check("cast x", x.len(), n)?;
        let mut l = self.stream.launch_builder(&self.to_f32);
        l.arg(x).arg(y).arg(&n);
        // SAFETY: as in add.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }
}
