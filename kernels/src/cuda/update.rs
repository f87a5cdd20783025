//! Launchers of update.cu: optimizer steps on f32 parameters in device
//! memory, written in place — AdamW ([`crate::update::adamw_update`], which
//! the engine's `AdamW` runs) and LOMO's fused SGD
//! ([`crate::update::sgd_update`]) with the squared norm of the raw gradient
//! reduced on the device; and the gradient handling of a training step that
//! stays on the device: accumulation over micro-batches, the global norm,
//! clipping; and AdaLomo's step ([`crate::update::adalomo_update`]), its
//! second moment on the device too.

use super::{check, driver, elementwise, grid_stride, int, one_block, Gpu, GpuError, THREADS};
use crate::update::{AdaLomo, AdamWStep};
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, PushKernelArg};
use std::sync::{Arc, Mutex, PoisonError};

/// Blocks of the SGD update at most, each leaving one f64 partial sum.
const REDUCE_BLOCKS: usize = 1024;
/// Blocks of one tensor's sum of squares at most (a global norm takes one
/// partial per block of every tensor).
const NORM_BLOCKS: usize = 64;

pub struct UpdateKernels {
    adamw: CudaFunction,
    sgd: CudaFunction,
    sum: CudaFunction,
    sum_f64: CudaFunction,
    squares: CudaFunction,
    accumulate: CudaFunction,
    clip: CudaFunction,
    adalomo: [CudaFunction; 7],
    /// The SGD and AdaLomo updates' per-block partial sums (two per block)
    /// and AdaLomo's scalars (the row mean, the effective learning rate, the
    /// update's scale). Every use is on `stream`, which orders them; the
    /// lock only keeps two host threads from interleaving their launches.
    partials: Mutex<(CudaSlice<f64>, CudaSlice<f32>)>,
    /// The global norm's partial sums (grown to the largest call) and its
    /// result.
    norm: Mutex<(Option<CudaSlice<f64>>, CudaSlice<f64>)>,
    stream: Arc<CudaStream>,
}

impl UpdateKernels {
    pub fn new(gpu: &Gpu) -> Result<UpdateKernels, GpuError> {
        let m = gpu.module("update")?;
        let f = |name| m.load_function(name).map_err(driver);
        Ok(UpdateKernels {
            adamw: f("adamw_update")?,
            sgd: f("sgd_update")?,
            sum: f("sum_partials")?,
            sum_f64: f("sum_partials_f64")?,
            squares: f("sum_squares")?,
            accumulate: f("grad_accumulate")?,
            clip: f("grad_clip")?,
            adalomo: [
                f("adalomo_rows")?,
                f("adalomo_cols")?,
                f("adalomo_vector")?,
                f("adalomo_row_mean")?,
                f("adalomo_norms")?,
                f("adalomo_finish")?,
                f("adalomo_apply")?,
            ],
            partials: Mutex::new((
                gpu.stream()
                    .alloc_zeros(2 * REDUCE_BLOCKS)
                    .map_err(driver)?,
                gpu.stream().alloc_zeros(3).map_err(driver)?,
            )),
            norm: Mutex::new((None, gpu.stream().alloc_zeros(1).map_err(driver)?)),
            stream: gpu.stream().clone(),
        })
    }

    /// One AdamW step of `p` (gradient `g`, moments `m`, `v`) with the
    /// scalars of `s` (`AdamWStep::new` from the step number and learning
    /// rate).
    pub fn adamw(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        s: &AdamWStep,
    ) -> Result<(), GpuError> {
        let n = p.len();
        for (what, len) in [("g", g.len()), ("m", m.len()), ("v", v.len())] {
            check(&format!("adamw {what}"), len, n)?;
        }
        if n == 0 {
            return Ok(());
        }
        let mut l = self.stream.launch_builder(&self.adamw);
        l.arg(p)
            .arg(g)
            .arg(m)
            .arg(v)
            .arg(&n)
            .arg(&s.decay)
            .arg(&s.w1)
            .arg(&s.b2)
            .arg(&s.w2)
            .arg(&s.bc2_sqrt)
            .arg(&s.eps)
            .arg(&s.neg_step);
        // SAFETY: arguments match; the grid-stride loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// LOMO's SGD step of `p` with gradient `g`: the learning rate `lr[0]`
    /// and clipping coefficient `coef[0]` are device scalars, `wd` and
    /// `clip_value` as [`crate::update::sgd_update`]. `sq[0]` gets the
    /// squared L2 norm of the raw gradient (an f64 sum, stored as f32 as the
    /// executor stores `sgd_update`'s result).
    #[allow(clippy::too_many_arguments)]
    pub fn sgd(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        lr: &CudaSlice<f32>,
        coef: &CudaSlice<f32>,
        wd: f32,
        clip_value: f32,
        sq: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let n = p.len();
        check("sgd g", g.len(), n)?;
        check("sgd lr", lr.len(), 1)?;
        check("sgd coef", coef.len(), 1)?;
        check("sgd sq", sq.len(), 1)?;
        let cfg = grid_stride(n, REDUCE_BLOCKS);
        let blocks = int("sgd blocks", cfg.grid_dim.0 as usize)?;
        let mut guard = self.partials.lock().unwrap_or_else(PoisonError::into_inner);
        let partials = &mut guard.0;
        let mut l = self.stream.launch_builder(&self.sgd);
        l.arg(p)
            .arg(g)
            .arg(lr)
            .arg(coef)
            .arg(&n)
            .arg(&wd)
            .arg(&clip_value)
            .arg(&mut *partials);
        // SAFETY: arguments match; the grid-stride loop stays within n; one
        // partial per block, at most REDUCE_BLOCKS (within the buffer).
        unsafe { l.launch(cfg) }.map_err(driver)?;
        self.sum_into(partials, blocks, sq)
    }

    /// `out[0]` = the sum of the first `blocks` partials, as f32.
    fn sum_into(
        &self,
        partials: &CudaSlice<f64>,
        blocks: i32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let mut l = self.stream.launch_builder(&self.sum);
        l.arg(partials).arg(&blocks).arg(out);
        // SAFETY: arguments match; reads `blocks` partials written before
        // on this stream.
        unsafe { l.launch(one_block()) }.map_err(driver)?;
        Ok(())
    }

    /// One AdaLomo step of `p` with gradient `g` ([`crate::update::adalomo_update`]):
    /// `shape` is `Some((rows, cols))` for a matrix, whose second moment is
    /// factored into `row[rows]` and `col[cols]`, or `None`, whose full
    /// second moment is `row[n]` (`col` unused). The learning rate `lr[0]`,
    /// gradient factor `coef[0]` and step number `step[0]` (from 1) are
    /// device scalars; with `lr[0] = 0` only `sq` is written. `sq[0]` gets
    /// the squared L2 norm of the raw gradient (f64 sum, stored as f32).
    #[allow(clippy::too_many_arguments)]
    pub fn adalomo(
        &self,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        row: &mut CudaSlice<f32>,
        col: &mut CudaSlice<f32>,
        shape: Option<(usize, usize)>,
        (lr, coef, step): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        h: &AdaLomo,
        sq: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let n = p.len();
        check("adalomo g", g.len(), n)?;
        for (what, v) in [("lr", lr), ("coef", coef), ("step", step)] {
            check(&format!("adalomo {what}"), v.len(), 1)?;
        }
        check("adalomo sq", sq.len(), 1)?;
        match shape {
            Some((rows, cols)) => {
                check("adalomo p", n, rows * cols)?;
                check("adalomo row", row.len(), rows)?;
                check("adalomo col", col.len(), cols)?;
            }
            None => check("adalomo state", row.len(), n)?,
        }
        let mut guard = self.partials.lock().unwrap_or_else(PoisonError::into_inner);
        let (partials, scal) = &mut *guard;
        // The raw gradient's squared norm, whatever lr is.
        let cfg = grid_stride(n, REDUCE_BLOCKS);
        let blocks = int("adalomo blocks", cfg.grid_dim.0 as usize)?;
        let mut l = self.stream.launch_builder(&self.squares);
        l.arg(g).arg(&n).arg(&mut *partials);
        // SAFETY: arguments match; one partial per block, at most REDUCE_BLOCKS.
        unsafe { l.launch(cfg) }.map_err(driver)?;
        self.sum_into(partials, blocks, sq)?;
        let [rows_k, cols_k, vector_k, mean_k, norms_k, finish_k, apply_k] = &self.adalomo;
        let (clip, eps1, decay) = (h.clip_value, h.eps1, h.decay_rate);
        let cols = match shape {
            Some((rows, cols)) => {
                let (r, c) = (int("adalomo rows", rows)?, int("adalomo cols", cols)?);
                let mut l = self.stream.launch_builder(rows_k);
                l.arg(g).arg(&mut *row).arg(&r).arg(&c);
                l.arg(lr)
                    .arg(coef)
                    .arg(step)
                    .arg(&clip)
                    .arg(&eps1)
                    .arg(&decay);
                // SAFETY: arguments match; blocks stride over the rows, each
                // row's cols values inside g (rows·cols = n, checked).
                unsafe { l.launch(grid_stride(rows * THREADS as usize, 65_535)) }
                    .map_err(driver)?;
                let mut l = self.stream.launch_builder(cols_k);
                l.arg(g).arg(&mut *col).arg(&r).arg(&c);
                l.arg(lr)
                    .arg(coef)
                    .arg(step)
                    .arg(&clip)
                    .arg(&eps1)
                    .arg(&decay);
                // SAFETY: arguments match; blocks stride over groups of 32
                // columns, checked against cols.
                unsafe { l.launch(grid_stride(cols.div_ceil(32) * THREADS as usize, 65_535)) }
                    .map_err(driver)?;
                let mut l = self.stream.launch_builder(mean_k);
                l.arg(&*row).arg(&r).arg(lr).arg(&mut *scal);
                // SAFETY: arguments match; reads rows values of row.
                unsafe { l.launch(one_block()) }.map_err(driver)?;
                cols
            }
            None => {
                let mut l = self.stream.launch_builder(vector_k);
                l.arg(g).arg(&mut *row).arg(&n);
                l.arg(lr)
                    .arg(coef)
                    .arg(step)
                    .arg(&clip)
                    .arg(&eps1)
                    .arg(&decay);
                // SAFETY: arguments match; the grid-stride loop stays within n.
                unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
                0
            }
        };
        let mut l = self.stream.launch_builder(norms_k);
        l.arg(&*p).arg(g).arg(&*row).arg(&*col).arg(&n).arg(&cols);
        l.arg(lr)
            .arg(coef)
            .arg(&clip)
            .arg(&*scal)
            .arg(&mut *partials);
        // SAFETY: arguments match; the grid-stride loop stays within n (and
        // row/col within rows/cols, checked); two partials per block, at
        // most 2·REDUCE_BLOCKS (the buffer's length).
        unsafe { l.launch(cfg) }.map_err(driver)?;
        let mut l = self.stream.launch_builder(finish_k);
        l.arg(&*partials).arg(&blocks).arg(&n).arg(lr);
        l.arg(&h.eps2).arg(&h.clip_threshold).arg(&mut *scal);
        // SAFETY: arguments match; reads the 2·blocks partials written above.
        unsafe { l.launch(one_block()) }.map_err(driver)?;
        let mut l = self.stream.launch_builder(apply_k);
        l.arg(p).arg(g).arg(&*row).arg(&*col).arg(&n).arg(&cols);
        l.arg(lr)
            .arg(coef)
            .arg(&clip)
            .arg(&h.weight_decay)
            .arg(&*scal);
        // SAFETY: arguments match; as adalomo_norms.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `acc = w·g` when `first`, else `acc + w·g`: a micro-batch's gradient
    /// into the step's (the trainer's host accumulation, bit for bit).
    pub fn accumulate(
        &self,
        acc: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        w: f32,
        first: bool,
    ) -> Result<(), GpuError> {
        let n = acc.len();
        check("accumulate g", g.len(), n)?;
        if n == 0 {
            return Ok(());
        }
        let first = first as i32;
        let mut l = self.stream.launch_builder(&self.accumulate);
        l.arg(acc).arg(g).arg(&w).arg(&n).arg(&first);
        // SAFETY: arguments match; the grid-stride loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// `g·coef` where `coef < 1` (`clip_grad_norm`'s scaling), then clamped
    /// to `±max_value` where that is positive.
    pub fn clip(&self, g: &mut CudaSlice<f32>, coef: f32, max_value: f32) -> Result<(), GpuError> {
        let n = g.len();
        if n == 0 || (coef >= 1.0 && max_value <= 0.0) {
            return Ok(());
        }
        let mut l = self.stream.launch_builder(&self.clip);
        l.arg(g).arg(&n).arg(&coef).arg(&max_value);
        // SAFETY: arguments match; the grid-stride loop stays within n.
        unsafe { l.launch(elementwise(n)) }.map_err(driver)?;
        Ok(())
    }

    /// The squared L2 norm of all of `gs` together, summed in f64 in an
    /// order that depends on the tensors' lengths only; waits for it.
    pub fn squared_norm(&self, gs: &[&CudaSlice<f32>]) -> Result<f64, GpuError> {
        let mut guard = self.norm.lock().unwrap_or_else(PoisonError::into_inner);
        let (partials, out) = &mut *guard;
        let need = (gs.len() * NORM_BLOCKS).max(1);
        if partials.as_ref().is_none_or(|p| p.len() < need) {
            *partials = Some(self.stream.alloc_zeros(need).map_err(driver)?);
        }
        let partials = partials.as_mut().expect("allocated above");
        let mut at = 0usize;
        for g in gs {
            let n = g.len();
            let cfg = grid_stride(n, NORM_BLOCKS);
            let mut window = partials.slice_mut(at..at + cfg.grid_dim.0 as usize);
            let mut l = self.stream.launch_builder(&self.squares);
            l.arg(*g).arg(&n).arg(&mut window);
            // SAFETY: arguments match; the grid-stride loop stays within n;
            // one partial per block, inside the window.
            unsafe { l.launch(cfg) }.map_err(driver)?;
            at += cfg.grid_dim.0 as usize;
        }
        let count = int("squared_norm partials", at)?;
        let mut l = self.stream.launch_builder(&self.sum_f64);
        l.arg(&*partials).arg(&count).arg(&mut *out);
        // SAFETY: arguments match; reads the `count` partials written above.
        unsafe { l.launch(one_block()) }.map_err(driver)?;
        let mut host = [0f64];
        self.stream.memcpy_dtoh(&*out, &mut host).map_err(driver)?;
        Ok(host[0])
    }
}
