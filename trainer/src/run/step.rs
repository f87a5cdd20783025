//! One optimizer step over a group of micro-batches, in one of three ways:
//! gradients out of the plan, accumulated and handed to the optimizer
//! (AdamW, SGD) on the host; the same for AdamW on the GPU, where the
//! gradients, the trained tensors and AdamW's moments stay; or LOMO's
//! update fused into the backward pass, on the host or on the GPU (where
//! the trained tensors and AdaLomo's state then stay).

use super::optimizer::Optimizer;
use super::session::Session;
use super::RunError;
use crate::data::batch::Packed;
use graft_engine::ir::{DType, ValueId};
use graft_engine::optim::clip_grad_norm;
use graft_engine::{Executor, FusedInputs, Plan, Tensor};
use graft_models::checkpoint::Checkpoint;
use graft_models::Recorded;

pub enum Stepper {
    Separate {
        plan: Plan,
        opt: Optimizer,
        /// The accumulated gradient of each trained tensor.
        acc: Vec<Vec<f32>>,
    },
    /// AdamW on the GPU: gradients summed, clipped and applied there as
    /// `Separate` does on the host; the trained tensors are the device's
    /// between steps ([`Stepper::sync_to_host`] copies them back).
    #[cfg(feature = "cuda")]
    Device {
        plan: Plan,
        opt: graft_engine::DeviceAdamW,
    },
    /// LOMO / AdaLomo: plan outputs `[loss, ‖grad‖² per parameter..]`.
    Fused {
        plan: Plan,
        inputs: FusedInputs,
        /// AdaLomo's second moments `(row, col)` per parameter.
        state: Vec<(Tensor, Tensor)>,
        /// Updates done (AdaLomo's t - 1).
        steps: u64,
        /// The plan runs on the GPU, which holds the trained tensors and
        /// the state between steps ([`Stepper::sync_to_host`] copies the
        /// tensors back, [`Stepper::state`] reads the state there).
        on_gpu: bool,
    },
}

/// What a step did.
pub struct Stepped {
    /// Mean loss over every counted token of the group.
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub norm: f64,
}

impl Stepper {
    pub fn plan(&self) -> &Plan {
        match self {
            Stepper::Separate { plan, .. } | Stepper::Fused { plan, .. } => plan,
            #[cfg(feature = "cuda")]
            Stepper::Device { plan, .. } => plan,
        }
    }

    /// AdamW's step, or a fused one with its trained tensors, moves to the
    /// GPU where `exec` runs the plan there.
    pub fn onto_device(self, exec: &mut Executor) -> Stepper {
        #[cfg(feature = "cuda")]
        match self {
            Stepper::Fused {
                plan,
                inputs,
                state,
                steps,
                ..
            } => {
                let on_gpu = exec.gpu_for(&plan).is_some();
                Stepper::Fused {
                    plan,
                    inputs,
                    state,
                    steps,
                    on_gpu,
                }
            }
            Stepper::Separate {
                plan,
                opt: Optimizer::AdamW(a),
                ..
            } if exec.gpu_for(&plan).is_some() => {
                let opt = graft_engine::DeviceAdamW::new(a.config);
                Stepper::Device { plan, opt }
            }
            other => other,
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = exec;
            self
        }
    }

    /// Where the optimizer's state lives, in words (`trainer run`'s device
    /// line).
    pub fn state_place(&self) -> &'static str {
        match self {
            #[cfg(feature = "cuda")]
            Stepper::Device { .. } => "the trained tensors and AdamW's state on the GPU",
            Stepper::Fused { on_gpu: true, .. } => {
                "the update fused into the backward pass; the trained tensors and its state on the GPU"
            }
            Stepper::Fused { .. } => "the update fused into the backward pass",
            Stepper::Separate { .. } => "the optimizer on the host",
        }
    }

    /// Copies the trained tensors back into the host model where the step
    /// keeps them on the device (before they are saved or read there).
    pub fn sync_to_host(
        &self,
        exec: &mut Executor,
        s: &mut Session,
        names: &[String],
    ) -> Result<(), RunError> {
        #[cfg(feature = "cuda")]
        let on_device = match self {
            Stepper::Device { plan, .. } => Some(device(exec, plan)?.download_params(plan)?),
            Stepper::Fused {
                plan, on_gpu: true, ..
            } => Some(device(exec, plan)?.download_owned(plan, plan.updated())?),
            _ => None,
        };
        #[cfg(feature = "cuda")]
        if let Some(params) = on_device {
            let mut host = super::trained(&mut s.model, s.lora.as_mut(), names)?;
            for (name, t) in params {
                let i = names.iter().position(|n| *n == name).ok_or_else(|| {
                    RunError::Invalid(format!("trained tensor `{name}` not found"))
                })?;
                host[i].copy_from_slice(t.as_f32()?);
            }
        }
        let _ = (exec, s, names);
        Ok(())
    }

    /// Names of the trained tensors, in the plan's order.
    pub fn names(&self) -> Vec<String> {
        let plan = self.plan();
        let params: Vec<ValueId> = match self {
            Stepper::Separate { plan, .. } => plan.grads().iter().map(|(p, _)| *p).collect(),
            #[cfg(feature = "cuda")]
            Stepper::Device { plan, .. } => plan.grads().iter().map(|(p, _)| *p).collect(),
            Stepper::Fused { plan, .. } => plan.updated().to_vec(),
        };
        params
            .iter()
            .map(|p| {
                plan.graph()
                    .leaf_name(*p)
                    .expect("params are named")
                    .to_string()
            })
            .collect()
    }

    /// The optimizer's own step count (checkpointed).
    pub fn optimizer_steps(&self) -> u64 {
        match self {
            Stepper::Separate { opt, .. } => opt.steps(),
            #[cfg(feature = "cuda")]
            Stepper::Device { opt, .. } => opt.step,
            Stepper::Fused { steps, .. } => *steps,
        }
    }

    /// The optimizer state as named tensors (PyTorch's slot names; AdaLomo's
    /// `<param>.adalomo_row` / `.adalomo_col`).
    pub fn state(
        &self,
        names: &[String],
        exec: &mut Executor,
    ) -> Result<Vec<(String, Tensor)>, RunError> {
        let _ = &exec;
        match self {
            Stepper::Separate { opt, .. } => opt.state(names),
            #[cfg(feature = "cuda")]
            Stepper::Device { plan, opt } => {
                let gpu = device(exec, plan)?;
                let mut out = Vec::new();
                for (name, n) in names.iter().zip(param_sizes(plan)) {
                    let (m, v) = opt.moments(gpu.gpu(), name, n)?;
                    out.push((format!("{name}.exp_avg"), Tensor::from_f32(&[n], &m)?));
                    out.push((format!("{name}.exp_avg_sq"), Tensor::from_f32(&[n], &v)?));
                }
                Ok(out)
            }
            Stepper::Fused {
                plan,
                inputs,
                state,
                on_gpu,
                ..
            } => {
                #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
                let mut state = state.clone();
                #[cfg(feature = "cuda")]
                if *on_gpu {
                    // The device's state, where it has taken it over.
                    let ids: Vec<ValueId> =
                        inputs.state.iter().flat_map(|&(r, c)| [r, c]).collect();
                    let held = device(exec, plan)?.download_owned(plan, &ids)?;
                    let by_name: std::collections::HashMap<_, _> = held.into_iter().collect();
                    for ((r, c), (rt, ct)) in inputs.state.iter().zip(state.iter_mut()) {
                        for (v, t) in [(r, rt), (c, ct)] {
                            let name = plan.graph().leaf_name(*v).expect("state is named");
                            if let Some(d) = by_name.get(name) {
                                *t = d.clone();
                            }
                        }
                    }
                }
                let _ = (plan, inputs, on_gpu);
                Ok(names
                    .iter()
                    .zip(state)
                    .flat_map(|(n, (r, c))| {
                        [
                            (format!("{n}.adalomo_row"), r),
                            (format!("{n}.adalomo_col"), c),
                        ]
                    })
                    .collect())
            }
        }
    }

    /// Restores what [`Stepper::state`] wrote, with `steps` taken.
    pub fn restore(
        &mut self,
        ckpt: &Checkpoint,
        names: &[String],
        steps: u64,
        exec: &mut Executor,
    ) -> Result<(), RunError> {
        let _ = &exec;
        match self {
            Stepper::Separate { opt, .. } => opt.restore(ckpt, names, steps),
            #[cfg(feature = "cuda")]
            Stepper::Device { plan, opt } => {
                let gpu = device(exec, plan)?;
                for (name, n) in names.iter().zip(param_sizes(plan)) {
                    let load = |slot: &str| -> Result<Vec<f32>, RunError> {
                        Ok(ckpt
                            .load(&format!("{name}.{slot}"), &[n], DType::F32)?
                            .to_f32_vec()?)
                    };
                    opt.set_moments(gpu.gpu(), name, &load("exp_avg")?, &load("exp_avg_sq")?)?;
                }
                opt.step = steps;
                Ok(())
            }
            Stepper::Fused {
                plan,
                inputs,
                state,
                steps: done,
                on_gpu,
            } => {
                for (n, (r, c)) in names.iter().zip(state.iter_mut()) {
                    *r = ckpt.load(&format!("{n}.adalomo_row"), r.shape(), DType::F32)?;
                    *c = ckpt.load(&format!("{n}.adalomo_col"), c.shape(), DType::F32)?;
                }
                *done = steps;
                // The next step copies the restored tensors and state to
                // the device again, whatever it held.
                #[cfg(feature = "cuda")]
                if *on_gpu {
                    let mut vs = plan.updated().to_vec();
                    vs.extend(inputs.state.iter().flat_map(|&(r, c)| [r, c]));
                    device(exec, plan)?.disown(plan, &vs);
                }
                let _ = (plan, inputs, on_gpu);
                Ok(())
            }
        }
    }

    /// Runs the group's micro-batches and applies the update at learning
    /// rate `lr`. A non-finite loss or gradient norm stops before updating
    /// (LOMO without clipping has updated already: its weights are then
    /// lost, the checkpoints on disk are not).
    pub fn step(
        &mut self,
        exec: &mut Executor,
        s: &mut Session,
        rec: &Recorded,
        group: &[Packed],
        names: &[String],
        lr: f64,
    ) -> Result<Stepped, RunError> {
        let t = &s.cfg.train;
        let (max_norm, max_value) = (t.max_grad_norm, t.max_grad_value);
        let n_total: usize = group.iter().map(|p| p.counted).sum();
        match self {
            Stepper::Separate { plan, opt, acc } => {
                let mut loss = 0f64;
                for (i, p) in group.iter().enumerate() {
                    let out = exec.run(plan, &rec.feeds(&s.model, s.lora.as_ref(), &p.batch)?)?;
                    let w = p.counted as f32 / n_total as f32;
                    loss += out[0].as_f32()?[0] as f64 * p.counted as f64 / n_total as f64;
                    for (j, a) in acc.iter_mut().enumerate() {
                        let g = out[1 + j].as_f32()?;
                        if i == 0 {
                            a.iter_mut().zip(g).for_each(|(a, &g)| *a = w * g);
                        } else {
                            a.iter_mut().zip(g).for_each(|(a, &g)| *a += w * g);
                        }
                    }
                }
                let mut grads: Vec<&mut [f32]> = acc.iter_mut().map(Vec::as_mut_slice).collect();
                let limit = if max_norm > 0.0 {
                    max_norm
                } else {
                    f64::INFINITY
                };
                let norm = clip_grad_norm(&mut grads, limit);
                let loss = loss as f32;
                if !loss.is_finite() || !norm.is_finite() {
                    return Ok(Stepped { loss, norm });
                }
                if max_value > 0.0 {
                    let v = max_value as f32;
                    grads
                        .iter_mut()
                        .for_each(|g| g.iter_mut().for_each(|x| *x = x.clamp(-v, v)));
                }
                let grads: Vec<&[f32]> = acc.iter().map(Vec::as_slice).collect();
                let mut params = super::trained(&mut s.model, s.lora.as_mut(), names)?;
                opt.step(&mut params, &grads, lr)?;
                Ok(Stepped { loss, norm })
            }
            #[cfg(feature = "cuda")]
            Stepper::Device { plan, opt } => {
                let gpu = device(exec, plan)?;
                let mut loss = 0f64;
                for (i, p) in group.iter().enumerate() {
                    let w = p.counted as f32 / n_total as f32;
                    let feeds = rec.feeds(&s.model, s.lora.as_ref(), &p.batch)?;
                    let l = gpu.accumulate(plan, &feeds, w, i == 0)?;
                    loss += l as f64 * p.counted as f64 / n_total as f64;
                }
                let loss = loss as f32;
                let norm = gpu.grad_norm(plan)?;
                if !loss.is_finite() || !norm.is_finite() {
                    return Ok(Stepped { loss, norm });
                }
                let coef = if max_norm > 0.0 {
                    graft_engine::optim::clip_coef(norm, max_norm)
                } else {
                    1.0
                };
                gpu.adamw_step(plan, opt, lr, coef, max_value as f32)?;
                Ok(Stepped { loss, norm })
            }
            Stepper::Fused {
                plan,
                inputs,
                state,
                steps,
                on_gpu,
            } => {
                let batch = &group[0].batch;
                let one = Tensor::from_f32(&[1], &[1.0])?;
                let t = Tensor::from_f32(&[1], &[(*steps + 1) as f32])?;
                let mut run = |exec: &mut Executor, s: &mut Session, lr: f32, c: &Tensor| {
                    let lr = Tensor::from_f32(&[1], &[lr])?;
                    let mut feeds = rec.feeds_mut(&mut s.model, batch)?;
                    feeds.bind(inputs.lr, &lr).bind(inputs.coef, c);
                    if let Some(step) = inputs.step {
                        feeds.bind(step, &t);
                    }
                    for ((r, c), (rt, ct)) in inputs.state.iter().zip(state.iter_mut()) {
                        feeds.bind_mut(*r, rt).bind_mut(*c, ct);
                    }
                    let out = run_fused(exec, plan, &feeds, *on_gpu)?;
                    let sq: f64 = out[1..]
                        .iter()
                        .map(|t| t.as_f32().map(|v| v[0] as f64))
                        .sum::<Result<f64, _>>()?;
                    Ok::<_, RunError>((out[0].as_f32()?[0], sq.sqrt()))
                };
                let c = if max_norm > 0.0 {
                    // LOMO's first pass: lr 0 measures the norm and writes nothing.
                    let (loss, norm) = run(exec, s, 0.0, &one)?;
                    if !loss.is_finite() || !norm.is_finite() {
                        return Ok(Stepped { loss, norm });
                    }
                    Tensor::from_f32(&[1], &[(max_norm / (norm + 1e-6)).min(1.0) as f32])?
                } else {
                    one.clone()
                };
                let (loss, norm) = run(exec, s, lr as f32, &c)?;
                *steps += 1;
                Ok(Stepped { loss, norm })
            }
        }
    }
}

/// Runs a fused step's `plan`: on the GPU, keeping what it updates there
/// (`on_gpu`), else wherever `exec` runs it.
fn run_fused(
    exec: &mut Executor,
    plan: &Plan,
    feeds: &graft_engine::Feeds,
    on_gpu: bool,
) -> Result<Vec<Tensor>, RunError> {
    #[cfg(feature = "cuda")]
    if on_gpu {
        return Ok(device(exec, plan)?.run_resident(plan, feeds)?);
    }
    let _ = on_gpu;
    Ok(exec.run(plan, feeds)?)
}

/// The GPU executor that runs `plan` (a `Device` stepper's).
#[cfg(feature = "cuda")]
fn device<'a>(
    exec: &'a mut Executor,
    plan: &Plan,
) -> Result<&'a mut graft_engine::GpuExecutor, RunError> {
    exec.gpu_for(plan).ok_or_else(|| {
        RunError::Invalid("the step's state is on a GPU this executor no longer runs it on".into())
    })
}

/// The number of values of each trained tensor of `plan`, in its order.
#[cfg(feature = "cuda")]
fn param_sizes(plan: &Plan) -> Vec<usize> {
    plan.grads()
        .iter()
        .map(|&(p, _)| plan.graph().ty(p).numel())
        .collect()
}
