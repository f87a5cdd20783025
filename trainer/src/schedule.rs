//! Learning-rate schedules as transformers defines them
//! (`get_{constant,linear,cosine}_schedule_with_warmup`): the learning rate
//! of optimizer step `step` (0-based), with a linear warm-up from 0.

use crate::config::Scheduler;
use std::f64::consts::PI;

pub fn lr_at(kind: Scheduler, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    let s = step as f64;
    if step < warmup {
        return base * s / warmup.max(1) as f64;
    }
    // Clamped: past `total` transformers' cosine would rise again.
    let progress = ((s - warmup as f64) / (total.saturating_sub(warmup)).max(1) as f64).min(1.0);
    base * match kind {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (1.0 - progress).max(0.0),
        Scheduler::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
    }
}
