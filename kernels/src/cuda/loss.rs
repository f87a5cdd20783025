//! Launchers of loss.cu: the softmax cross-entropy of f32 or bf16 logits,
//! its mean over counted tokens and the logits' gradient in one pass, or the
//! loss or the gradient alone; the CPU twin is
//! [`crate::loss::cross_entropy`] with [`crate::loss::cross_entropy_grad`].

use super::ids::index_error;
use super::{check, driver, int, one_block, per_row, DeviceElem, Gpu, GpuError, Ids};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::Arc;

pub struct LossKernels {
    /// Loss and gradient in one pass, by logits type ([`DeviceElem::INDEX`]).
    fwd_bwd: [CudaFunction; 2],
    /// The loss alone, likewise.
    loss_rows: [CudaFunction; 2],
    /// The gradient alone, likewise.
    grad: [CudaFunction; 2],
    mean: CudaFunction,
    stream: Arc<CudaStream>,
}

impl LossKernels {
    pub fn new(gpu: &Gpu) -> Result<LossKernels, GpuError> {
        let m = gpu.module("loss")?;
        let f = |name| m.load_function(name).map_err(driver);
        Ok(LossKernels {
            fwd_bwd: [f("cross_entropy_fwd_bwd_f32")?, f("cross_entropy_fwd_bwd")?],
            loss_rows: [f("cross_entropy_rows_f32")?, f("cross_entropy_rows_bf16")?],
            grad: [f("cross_entropy_grad_f32")?, f("cross_entropy_grad_bf16")?],
            mean: f("mean_loss")?,
            stream: gpu.stream().clone(),
        })
    }

    /// Cross-entropy of `logits[tokens, vocab]` (`tokens = labels.len()`):
    /// `row_loss[t] = lse(logits[t]) − logits[t, labels[t]]` (0 where the
    /// label is `ignore`), `loss[0]` their mean over counted rows (NaN when
    /// none is counted), and `dlogits = dloss·(softmax − onehot)/counted`
    /// (zero rows where ignored). Labels are checked on the host first: one
    /// outside `0..vocab` that is not `ignore` is an error naming it, and
    /// nothing is launched.
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy<T: DeviceElem>(
        &self,
        logits: &CudaSlice<T>,
        labels: Ids,
        ignore: i32,
        dloss: f32,
        dlogits: &mut CudaSlice<T>,
        row_loss: &mut CudaSlice<f32>,
        loss: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let vocab = logits.len() / labels.len().max(1);
        let counted =
            crate::loss::check_labels(labels.host(), vocab, ignore).map_err(index_error)?;
        self.rows(
            logits,
            labels,
            ignore,
            dloss / counted as f32,
            dlogits,
            row_loss,
        )?;
        self.mean(row_loss, counted, loss)
    }

    /// The per-row part of [`Self::cross_entropy`] (one chunk of a longer
    /// batch): `row_loss` and `dlogits = c·(softmax − onehot)`. Returns how
    /// many rows were counted. f32 or bf16 logits, the gradient in their type.
    pub fn rows<T: DeviceElem>(
        &self,
        logits: &CudaSlice<T>,
        labels: Ids,
        ignore: i32,
        c: f32,
        dlogits: &mut CudaSlice<T>,
        row_loss: &mut CudaSlice<f32>,
    ) -> Result<usize, GpuError> {
        let rows = labels.len();
        let vocab = logits.len() / rows.max(1);
        check("cross_entropy logits", logits.len(), rows * vocab)?;
        check("cross_entropy dlogits", dlogits.len(), rows * vocab)?;
        check("cross_entropy row_loss", row_loss.len(), rows)?;
        let counted =
            crate::loss::check_labels(labels.host(), vocab, ignore).map_err(index_error)?;
        let v = int("cross_entropy vocab", vocab)?;
        if rows > 0 {
            let mut l = self.stream.launch_builder(&self.fwd_bwd[T::INDEX]);
            l.arg(logits)
                .arg(labels.device())
                .arg(dlogits)
                .arg(&mut *row_loss)
                .arg(&v)
                .arg(&ignore)
                .arg(&c);
            // SAFETY: arguments match; one block per row of `vocab` values.
            unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        }
        Ok(counted)
    }

    /// The logits' gradient alone, `dloss[0]·(softmax − onehot)/counted`
    /// (zero rows where ignored), in the logits' type: the unfused
    /// cross-entropy's backward, `dloss` a value on the device. Labels are
    /// checked on the host first, as [`Self::cross_entropy`]'s.
    pub fn grad<T: DeviceElem>(
        &self,
        logits: &CudaSlice<T>,
        labels: Ids,
        ignore: i32,
        dloss: &CudaSlice<f32>,
        dlogits: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        let rows = labels.len();
        let vocab = logits.len() / rows.max(1);
        check("cross_entropy_grad logits", logits.len(), rows * vocab)?;
        check("cross_entropy_grad dlogits", dlogits.len(), rows * vocab)?;
        check("cross_entropy_grad dloss", dloss.len(), 1)?;
        let counted =
            crate::loss::check_labels(labels.host(), vocab, ignore).map_err(index_error)?;
        if rows == 0 {
            return Ok(());
        }
        // As the CPU: dloss / counted in f32 (0/0 where nothing counts:
        // every row is then zeros anyway).
        let (v, counted) = (int("cross_entropy vocab", vocab)?, counted as f32);
        let mut l = self.stream.launch_builder(&self.grad[T::INDEX]);
        l.arg(logits)
            .arg(labels.device())
            .arg(dlogits)
            .arg(&v)
            .arg(&ignore)
            .arg(dloss)
            .arg(&counted);
        // SAFETY: arguments match; one block per row of `vocab` values.
        unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        Ok(())
    }

    /// The mean cross-entropy alone (an eval plan's loss), of f32 or bf16
    /// `logits[tokens, vocab]`: `row_loss` as [`Self::cross_entropy`]'s.
    pub fn loss_only<T: DeviceElem>(
        &self,
        logits: &CudaSlice<T>,
        labels: Ids,
        ignore: i32,
        row_loss: &mut CudaSlice<f32>,
        loss: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let rows = labels.len();
        let vocab = logits.len() / rows.max(1);
        check("cross_entropy logits", logits.len(), rows * vocab)?;
        check("cross_entropy row_loss", row_loss.len(), rows)?;
        let counted =
            crate::loss::check_labels(labels.host(), vocab, ignore).map_err(index_error)?;
        let v = int("cross_entropy vocab", vocab)?;
        if rows > 0 {
            let mut l = self.stream.launch_builder(&self.loss_rows[T::INDEX]);
            l.arg(logits)
                .arg(labels.device())
                .arg(&mut *row_loss)
                .arg(&v)
                .arg(&ignore);
            // SAFETY: arguments match; one block per row of `vocab` values.
            unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        }
        self.mean(row_loss, counted, loss)
    }

    /// `loss[0] = Σ row_loss / counted` (f64 sum; NaN when `counted` is 0).
    pub fn mean(
        &self,
        row_loss: &CudaSlice<f32>,
        counted: usize,
        loss: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        check("mean loss", loss.len(), 1)?;
        let r = int("cross_entropy tokens", row_loss.len())?;
        let counted = counted as f64;
        let mut l = self.stream.launch_builder(&self.mean);
        l.arg(row_loss).arg(&r).arg(&counted).arg(loss);
        // SAFETY: arguments match; one block reduces the rows.
        unsafe { l.launch(one_block()) }.map_err(driver)?;
        Ok(())
    }
}
