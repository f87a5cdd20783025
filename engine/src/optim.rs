//! Optimizers that run after a plan, on its gradient outputs, updating f32
//! parameters in place. The arithmetic follows PyTorch's single-tensor CPU
//! implementations operation by operation (f32 tensors, f64 scalars, fused
//! multiply-adds where ATen's vectorised kernels fuse), so a run reproduces
//! `torch.optim` bit for bit (tests/optim_torch.rs; the spec is
//! tests/oracle/make_optim_fixtures.py).

use crate::EngineError;
use graft_kernels::update::{adamw_update, AdamWStep};

/// AdamW hyperparameters (PyTorch's defaults but the learning rate).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW with decoupled weight decay and one f32 state pair per parameter.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken (the bias corrections' exponent).
    pub step: u64,
    /// First and second moments, one pair per parameter, in parameter order.
    pub moments: Vec<(Vec<f32>, Vec<f32>)>,
}

fn check_lengths(
    params: &[&mut [f32]],
    grads: &[&[f32]],
    sizes: &[usize],
) -> Result<(), EngineError> {
    if params.len() != grads.len() || params.len() != sizes.len() {
        return Err(EngineError::Tensor(format!(
            "optimizer: {} parameters, {} gradients, {} states",
            params.len(),
            grads.len(),
            sizes.len()
        )));
    }
    for (i, ((p, g), n)) in params.iter().zip(grads).zip(sizes).enumerate() {
        if p.len() != g.len() || p.len() != *n {
            return Err(EngineError::Tensor(format!(
                "optimizer: parameter {i} has {} values, its gradient {}, its state {n}",
                p.len(),
                g.len()
            )));
        }
    }
    Ok(())
}

impl AdamW {
    /// State for parameters of the given sizes.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> AdamW {
        AdamW {
            config,
            step: 0,
            moments: sizes
                .iter()
                .map(|&n| (vec![0.0; n], vec![0.0; n]))
                .collect(),
        }
    }

    /// One step at learning rate `lr` (schedules set it per step).
    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f64,
    ) -> Result<(), EngineError> {
        let sizes: Vec<usize> = self.moments.iter().map(|(m, _)| m.len()).collect();
        check_lengths(params, grads, &sizes)?;
        let c = self.config;
        self.step += 1;
        let s = AdamWStep::new(
            lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            self.step as i32,
        );
        for ((p, g), (m, v)) in params.iter_mut().zip(grads).zip(&mut self.moments) {
            adamw_update(p, g, m, v, &s);
        }
        Ok(())
    }
}

/// SGD with optional momentum and (coupled) weight decay, as `torch.optim.SGD`
/// with dampening 0 and no Nesterov.
#[derive(Clone, Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    /// Momentum buffers, created at the first step (as PyTorch's).
    pub buffers: Option<Vec<Vec<f32>>>,
    sizes: Vec<usize>,
}

impl Sgd {
    pub fn new(momentum: f64, weight_decay: f64, sizes: &[usize]) -> Sgd {
        Sgd {
            momentum,
            weight_decay,
            buffers: None,
            sizes: sizes.to_vec(),
        }
    }

    pub fn step(
        &mut self,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
        lr: f64,
    ) -> Result<(), EngineError> {
        check_lengths(params, grads, &self.sizes)?;
        let (wd, mu, neg_lr) = (self.weight_decay as f32, self.momentum as f32, (-lr) as f32);
        // Momentum buffers exist only with momentum (PyTorch keeps none without).
        let first = self.buffers.is_none();
        let mut buffers = match mu != 0.0 {
            true => Some(
                self.buffers
                    .get_or_insert_with(|| self.sizes.iter().map(|&n| vec![0.0; n]).collect()),
            ),
            false => None,
        };
        for (j, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            for i in 0..p.len() {
                // `add(.., alpha)` is one fused multiply-add in ATen.
                let mut d = g[i];
                if wd != 0.0 {
                    d = p[i].mul_add(wd, d);
                }
                if let Some(bufs) = buffers.as_mut() {
                    let b = &mut bufs[j][i];
                    *b = if first { d } else { *b * mu + d };
                    d = *b;
                }
                p[i] = d.mul_add(neg_lr, p[i]);
            }
        }
        Ok(())
    }
}

/// Scales gradients so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: the factor is
/// `min(1, max_norm / (norm + 1e-6))`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    let coef = clip_coef(norm, max_norm);
    if coef < 1.0 {
        grads
            .iter_mut()
            .flat_map(|g| g.iter_mut())
            .for_each(|x| *x *= coef);
    }
    norm
}

/// The factor [`clip_grad_norm`] scales gradients of global norm `norm` by
/// (PyTorch's `clip_grad_norm_`): below 1 only where `norm` is over
/// `max_norm`.
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}
