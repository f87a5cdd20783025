//! Launchers of embedding.cu: the lookup of bf16 (or f32) rows by token id
//! and its gradient into an f32 table, deterministic (no atomics: one block per
//! distinct id, adding its tokens in order); the CPU twins are
//! [`crate::embedding::embedding`] and [`crate::embedding::embedding_grad`].

use super::ids::index_error;
use super::{check, driver, elementwise, int, per_row, DeviceElem, DeviceIds, Gpu, GpuError, Ids};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::Arc;

pub struct EmbeddingKernels {
    /// `embedding_fwd_f32`, `embedding_fwd`: by [`DeviceElem::INDEX`].
    fwd: [CudaFunction; 2],
    /// `embedding_bwd_f32`, `embedding_bwd`: by the gradient's type.
    bwd: [CudaFunction; 2],
    stream: Arc<CudaStream>,
}

fn width(h: usize) -> Result<i32, GpuError> {
    if h == 0 {
        return Err(GpuError::Shape("embedding: rows of width 0".into()));
    }
    int("embedding width", h)
}

impl EmbeddingKernels {
    pub fn new(gpu: &Gpu) -> Result<EmbeddingKernels, GpuError> {
        let m = gpu.module("embedding")?;
        let f = |name| m.load_function(name).map_err(driver);
        Ok(EmbeddingKernels {
            fwd: [f("embedding_fwd_f32")?, f("embedding_fwd")?],
            bwd: [f("embedding_bwd_f32")?, f("embedding_bwd")?],
            stream: gpu.stream().clone(),
        })
    }

    /// `y[t, :] = table[ids[t], :]` for `table[vocab, h]`. An id outside
    /// `0..vocab` is an error naming it, and nothing is launched.
    pub fn embedding<T: DeviceElem>(
        &self,
        table: &CudaSlice<T>,
        ids: Ids,
        h: usize,
        y: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let hi = width(h)?;
        let vocab = table.len() / h;
        check("embedding table", table.len(), vocab * h)?;
        check("embedding y", y.len(), ids.len() * h)?;
        crate::embedding::check_ids(ids.host(), vocab).map_err(index_error)?;
        if ids.is_empty() {
            return Ok(());
        }
        // Every valid id is below i32::MAX, whatever the table's size.
        let (n, v) = (y.len(), vocab.min(i32::MAX as usize) as i32);
        let mut l = self.stream.launch_builder(&self.fwd[T::INDEX]);
        l.arg(table)
            .arg(ids.device())
            .arg(y)
            .arg(&n)
            .arg(&hi)
            .arg(&v);
        // SAFETY: arguments match; the grid-stride loop stays within n; ids
        // checked above.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `dtable[v, :] = Σ dy[t, :]` over the tokens `t` with `ids[t] = v`
    /// (zero rows for ids that occur nowhere), f32 sums of the bf16 `dy` in
    /// token order: bit-identical to the CPU's. An id outside `0..vocab` is
    /// an error naming it, and nothing is written.
    pub fn embedding_grad<T: DeviceElem>(
        &self,
        dy: &CudaSlice<T>,
        ids: &DeviceIds,
        h: usize,
        dtable: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let hi = width(h)?;
        let vocab = dtable.len() / h;
        check("embedding_grad dtable", dtable.len(), vocab * h)?;
        check("embedding_grad dy", dy.len(), ids.len() * h)?;
        crate::embedding::check_ids(ids.host(), vocab).map_err(index_error)?;
        if dtable.is_empty() {
            return Ok(());
        }
        self.stream.memset_zeros(dtable).map_err(driver)?;
        let (order, starts, groups) = ids.groups();
        if groups == 0 {
            return Ok(());
        }
        let mut l = self.stream.launch_builder(&self.bwd[T::INDEX]);
        l.arg(dy)
            .arg(ids.device())
            .arg(order)
            .arg(starts)
            .arg(dtable)
            .arg(&hi);
        // SAFETY: arguments match; block b reads the tokens
        // order[starts[b]..starts[b+1]] (a partition of 0..len, built by
        // DeviceIds) and writes row ids[..] of dtable, checked above.
        unsafe { l.launch(per_row(groups)) }.map_err(driver)?;
        Ok(())
    }
}
