//! The configured optimizer over the trained tensors, and its state as
//! named tensors for checkpoints.

use super::RunError;
use crate::config::{OptimizerName, TrainSection};
use graft_engine::optim::{AdamW, AdamWConfig, Sgd};
use graft_engine::Tensor;
use graft_models::checkpoint::Checkpoint;

pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Optimizer {
    /// The optimizer that runs after the plan (LOMO runs inside it).
    pub fn new(t: &TrainSection, sizes: &[usize]) -> Result<Optimizer, RunError> {
        Ok(match t.optimizer {
            OptimizerName::Adamw => Optimizer::AdamW(AdamW::new(
                AdamWConfig {
                    beta1: t.adam_beta1,
                    beta2: t.adam_beta2,
                    eps: t.adam_epsilon,
                    weight_decay: t.weight_decay,
                },
                sizes,
            )),
            OptimizerName::Sgd => Optimizer::Sgd(Sgd::new(t.momentum, t.weight_decay, sizes)),
            OptimizerName::Lomo | OptimizerName::Adalomo => {
                return Err(RunError::Invalid(
                    "lomo's update runs inside the plan, not after it".into(),
                ))
            }
        })
    }

    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f64,
    ) -> Result<(), RunError> {
        match self {
            Optimizer::AdamW(o) => o.step(params, grads, lr)?,
            Optimizer::Sgd(o) => o.step(params, grads, lr)?,
        }
        Ok(())
    }

    /// Steps taken (AdamW's bias-correction exponent; 0 for SGD).
    pub fn steps(&self) -> u64 {
        match self {
            Optimizer::AdamW(o) => o.step,
            Optimizer::Sgd(_) => 0,
        }
    }

    /// The state as tensors named `<param>.<slot>` (PyTorch's slot names).
    pub fn state(&self, names: &[String]) -> Result<Vec<(String, Tensor)>, RunError> {
        let vec = |v: &[f32]| Tensor::from_f32(&[v.len()], v);
        let mut out = Vec::new();
        match self {
            Optimizer::AdamW(o) => {
                for (n, (m, v)) in names.iter().zip(&o.moments) {
                    out.push((format!("{n}.exp_avg"), vec(m)?));
                    out.push((format!("{n}.exp_avg_sq"), vec(v)?));
                }
            }
            Optimizer::Sgd(o) => {
                for (n, b) in names.iter().zip(o.buffers.iter().flatten()) {
                    out.push((format!("{n}.momentum_buffer"), vec(b)?));
                }
            }
        }
        Ok(out)
    }

    /// Restores what [`Optimizer::state`] wrote, with `steps` taken.
    pub fn restore(
        &mut self,
        ckpt: &Checkpoint,
        names: &[String],
        steps: u64,
    ) -> Result<(), RunError> {
        let load = |name: String, n: usize| -> Result<Vec<f32>, RunError> {
            Ok(ckpt
                .load(&name, &[n], graft_engine::ir::DType::F32)?
                .to_f32_vec()?)
        };
        match self {
            Optimizer::AdamW(o) => {
                for (n, (m, v)) in names.iter().zip(o.moments.iter_mut()) {
                    *m = load(format!("{n}.exp_avg"), m.len())?;
                    *v = load(format!("{n}.exp_avg_sq"), v.len())?;
                }
                o.step = steps;
            }
            Optimizer::Sgd(o) => {
                // Buffers exist once a momentum step was taken.
                if names
                    .first()
                    .is_some_and(|n| ckpt.contains(&format!("{n}.momentum_buffer")))
                {
                    let sizes: Vec<usize> = names
                        .iter()
                        .map(|n| {
                            ckpt.entry(&format!("{n}.momentum_buffer"))
                                .map(|(_, e)| e.shape.iter().product())
                        })
                        .collect::<Result<_, _>>()?;
                    o.buffers = Some(
                        names
                            .iter()
                            .zip(sizes)
                            .map(|(n, s)| load(format!("{n}.momentum_buffer"), s))
                            .collect::<Result<_, _>>()?,
                    );
                }
            }
        }
        Ok(())
    }
}
