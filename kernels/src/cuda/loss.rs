//! Launchers of loss.cu: the softmax cross-entropy of bf16 logits, its mean
//! over counted tokens and the logits' gradient in one pass; the CPU twin is
//! [`crate::loss::cross_entropy`] with [`crate::loss::cross_entropy_grad`].

use super::ids::index_error;
use super::{check, driver, int, one_block, per_row, DeviceIds, Gpu, GpuError};
use crate::bf16;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::Arc;

pub struct LossKernels {
    fwd_bwd: CudaFunction,
    mean: CudaFunction,
    stream: Arc<CudaStream>,
}

impl LossKernels {
    pub fn new(gpu: &Gpu) -> Result<LossKernels, GpuError> {
        let m = gpu.module("loss")?;
        let f = |name| m.load_function(name).map_err(driver);
        Ok(LossKernels {
            fwd_bwd: f("cross_entropy_fwd_bwd")?,
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
    pub fn cross_entropy(
        &self,
        logits: &CudaSlice<bf16>,
        labels: &DeviceIds,
        ignore: i32,
        dloss: f32,
        dlogits: &mut CudaSlice<bf16>,
        row_loss: &mut CudaSlice<f32>,
        loss: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let rows = labels.len();
        let vocab = logits.len() / rows.max(1);
        check("cross_entropy logits", logits.len(), rows * vocab)?;
        check("cross_entropy dlogits", dlogits.len(), rows * vocab)?;
        check("cross_entropy row_loss", row_loss.len(), rows)?;
        check("cross_entropy loss", loss.len(), 1)?;
        let counted =
            crate::loss::check_labels(labels.host(), vocab, ignore).map_err(index_error)?;
        let (v, r) = (
            int("cross_entropy vocab", vocab)?,
            int("cross_entropy tokens", rows)?,
        );
        // The CPU's scale, in f32 as there.
        let c = dloss / counted as f32;
        if rows > 0 {
            let mut l = self.stream.launch_builder(&self.fwd_bwd);
            l.arg(logits)
                .arg(labels.device())
                .arg(dlogits)
                .arg(&mut *row_loss)
                .arg(&v)
                .arg(&ignore)
                .arg(&c);
            // SAFETY: arguments match the kernel; one block per row, each
            // within its checked `vocab` values; labels checked above.
            unsafe { l.launch(per_row(rows)) }.map_err(driver)?;
        }
        let counted = counted as f64;
        let mut l = self.stream.launch_builder(&self.mean);
        l.arg(&*row_loss).arg(&r).arg(&counted).arg(loss);
        // SAFETY: arguments match; the kernel reads `rows` losses, writes one.
        unsafe { l.launch(one_block()) }.map_err(driver)?;
        Ok(())
    }
}
