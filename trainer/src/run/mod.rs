//! `trainer run`: the training loop. One compiled plan per run; each
//! optimizer step accumulates `grad_accum` micro-batches with weights
//! `n_i / N` (counted tokens), so the step's loss and gradient are those of
//! the mean over every counted token of the whole accumulated batch.

pub mod checkpoint;
pub mod metrics;
mod optimizer;
pub mod session;
pub mod step;

use crate::config::{Config, ConfigError, Method, OptimizerName};
use crate::data::batch::{batches, Packed};
use crate::data::DataError;
use crate::schedule::lr_at;
use checkpoint::TrainerState;
use graft_engine::ir::AdaLomoSpec;
use graft_engine::rng::Rng;
use graft_engine::{
    compile, compile_fused_with, compile_training_with, CompileOptions, Executor, FusedRule, Plan,
    Tensor,
};
use graft_models::{CausalLm, Lora, ModelError, RecordOptions, Recorded};
use optimizer::Optimizer;
use serde_json::json;
use session::Session;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use step::Stepper;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Engine(#[from] graft_engine::EngineError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Invalid(String),
    #[error("step {step}: the loss is {value}; stopping. {kept}")]
    Diverged {
        step: usize,
        value: String,
        kept: String,
    },
}

/// How to run (what is not part of the configuration).
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Continue from the newest checkpoint in the output directory.
    pub resume: bool,
    /// Stop (as if killed) after this many steps of this process, without
    /// the final save: for tests of resuming.
    pub stop_after: Option<usize>,
    /// Draw a progress bar (when stderr is a terminal).
    pub progress: bool,
    /// Time every node the executor runs, by kind, and print the table
    /// (the 30 costliest kinds) when training ends.
    pub profile: bool,
}

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub steps: usize,
    pub loss: f32,
    pub eval_loss: Option<f32>,
    /// Held-out exact match (correct, total) before and after training,
    /// when `output.eval_accuracy` is set.
    pub accuracy_before: Option<(usize, usize)>,
    pub accuracy_after: Option<(usize, usize)>,
    /// The trained adapter (or, for full fine-tuning, the model) directory.
    pub output: PathBuf,
}

/// One step's micro-batches: a slice of an epoch's batches.
struct Epoch {
    index: usize,
    micro: Vec<Packed>,
}

/// The seed of micro-batch `micro_step`'s dropout masks.
fn dropout_seed(seed: u64, micro_step: u64) -> u32 {
    Rng::new(seed ^ micro_step.wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64() as u32
}

/// The trained tensors in `names` order, borrowed mutably.
fn trained<'a>(
    model: &'a mut CausalLm,
    lora: Option<&'a mut Lora>,
    names: &[String],
) -> Result<Vec<&'a mut [f32]>, RunError> {
    let mut by_name: HashMap<String, &'a mut Tensor> = match lora {
        Some(l) => l.modules.iter_mut().flat_map(|m| m.tensors_mut()).collect(),
        None => model
            .weights_mut()
            .iter_mut()
            .map(|(k, v)| (k.clone(), v))
            .collect(),
    };
    names
        .iter()
        .map(|n| {
            let t = by_name
                .remove(n)
                .ok_or_else(|| RunError::Invalid(format!("trained tensor `{n}` not found")))?;
            Ok(t.as_f32_mut()?)
        })
        .collect()
}

/// A forward plan with the loss, for evaluation.
pub struct EvalPlan {
    rec: Recorded,
    plan: Plan,
    batches: Vec<Packed>,
}

impl EvalPlan {
    pub fn new(s: &Session, docs: &[crate::data::tokenize::Tokenized]) -> Result<Self, RunError> {
        let rows = s.cfg.train.micro_batch_size;
        let row_len = s.row_len(docs);
        let batches = batches(docs, rows, row_len, s.cfg.data.packing, s.pad_id);
        let rec = s.model.record(
            rows * row_len,
            RecordOptions {
                lora: s.lora.as_ref(),
                loss: true,
                ..Default::default()
            },
        )?;
        let plan = compile(
            rec.graph.clone(),
            &[rec.loss.expect("recorded with a loss")],
        )?;
        Ok(EvalPlan { rec, plan, batches })
    }

    /// The compiled eval step.
    pub fn plan(&self) -> &graft_engine::Plan {
        &self.plan
    }

    /// The mean loss over every counted token.
    pub fn loss(&self, s: &Session, exec: &mut Executor) -> Result<f32, RunError> {
        let (mut sum, mut n) = (0f64, 0usize);
        for p in &self.batches {
            let out = exec.run(
                &self.plan,
                &self.rec.feeds(&s.model, s.lora.as_ref(), &p.batch)?,
            )?;
            sum += out[0].as_f32()?[0] as f64 * p.counted as f64;
            n += p.counted;
        }
        Ok((sum / n.max(1) as f64) as f32)
    }
}

/// The training step `trainer run` compiles for micro-batches of `tokens`
/// tokens: the recorded graph, and the plan with its optimizer (fused into
/// the plan for LOMO / AdaLomo; the optimizer's state is sized later).
/// `fuse` and `recompute` choose the passes (`trainer plan` compares them;
/// a run takes fusion and the configuration's gradient_checkpointing).
pub fn step_plan(
    s: &Session,
    tokens: usize,
    fuse: bool,
    recompute: bool,
) -> Result<(Recorded, Stepper), RunError> {
    let cfg = &s.cfg;
    let full = cfg.adapter.method == Method::Full;
    let rec = s.model.record(
        tokens,
        RecordOptions {
            lora: s.lora.as_ref(),
            train_lora: !full,
            train_base: full,
            loss: true,
            dropout: true,
            ..Default::default()
        },
    )?;
    let loss_v = rec.loss.expect("recorded with a loss");
    let opts = CompileOptions {
        fuse,
        checkpoints: match recompute {
            true => rec.layer_inputs.clone(),
            false => Vec::new(),
        },
    };
    let fused = match cfg.train.optimizer {
        OptimizerName::Lomo => Some(FusedRule::Sgd {
            weight_decay: cfg.train.weight_decay as f32,
            clip_value: cfg.train.max_grad_value as f32,
        }),
        OptimizerName::Adalomo => Some(FusedRule::AdaLomo(AdaLomoSpec {
            weight_decay: cfg.train.weight_decay as f32,
            clip_value: cfg.train.max_grad_value as f32,
            ..AdaLomoSpec::default()
        })),
        OptimizerName::Adamw | OptimizerName::Sgd => None,
    };
    let stepper = match fused {
        Some(rule) => {
            let (plan, inputs) = compile_fused_with(rec.graph.clone(), loss_v, rule, &opts)?;
            let state = inputs.zero_state(&plan);
            Stepper::Fused {
                plan,
                inputs,
                state,
                steps: 0,
                on_gpu: false,
            }
        }
        None => Stepper::Separate {
            plan: compile_training_with(rec.graph.clone(), loss_v, &[], &opts)?,
            opt: Optimizer::new(&cfg.train, &[])?,
            acc: Vec::new(),
        },
    };
    Ok((rec, stepper))
}

/// The run's schedule: steps per epoch and in all.
fn total_steps(cfg: &Config, batches_per_epoch: usize) -> usize {
    let per_epoch = batches_per_epoch.div_ceil(cfg.train.grad_accum);
    if cfg.train.max_steps > 0 {
        cfg.train.max_steps
    } else {
        cfg.train.epochs * per_epoch
    }
}

/// Trains as `cfg` says; see the module documentation.
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<RunReport, RunError> {
    let out_dir = cfg.output.dir.clone();
    checkpoint::remove_partial(&out_dir);
    let existing = checkpoint::list(&out_dir)?;
    let resume_from = match (opts.resume, existing.last()) {
        (true, Some((_, dir))) => Some(dir.clone()),
        (true, None) => {
            return Err(RunError::Invalid(format!(
                "--resume: {} holds no checkpoint to resume from",
                out_dir.display()
            )))
        }
        (false, Some((_, dir))) => {
            return Err(RunError::Invalid(format!(
                "{} already holds a run ({}); pass --resume to continue it, or set output.dir to another directory",
                out_dir.display(),
                dir.display()
            )))
        }
        (false, None) => {
            // What a finished run leaves, its metrics with its adapter or
            // model (its checkpoints may be deleted to save disk), is not
            // written over either. A run stopped before its first
            // checkpoint left only metrics.jsonl: it starts over; a folder
            // that merely holds a model/ (a base model) is no run.
            let finished = out_dir.join("metrics.jsonl").is_file();
            if let Some(f) = ["adapter", "model"]
                .iter()
                .map(|f| out_dir.join(f))
                .find(|f| finished && f.exists())
            {
                return Err(RunError::Invalid(format!(
                    "{} already holds a run's output ({}); set output.dir to another directory, or remove it",
                    out_dir.display(),
                    f.display()
                )));
            }
            // Full fine-tuning writes OUT/model, which must not replace a
            // model that is not this run's (the base itself, as like as not).
            let model = out_dir.join("model");
            if cfg.adapter.method == Method::Full && model.exists() {
                return Err(RunError::Invalid(format!(
                    "{} exists: full fine-tuning writes its model there; set output.dir to another directory",
                    model.display()
                )));
            }
            None
        }
    };
    let state0 = match &resume_from {
        Some(dir) => {
            let st = checkpoint::read_state(dir)?;
            session::check_same_config(cfg, &st.config, dir)?;
            Some(st)
        }
        None => None,
    };

    let mut s =
        Session::open(cfg, resume_from.as_deref()).map_err(|e| match (e, &resume_from) {
            (RunError::Model(e), Some(dir)) => checkpoint::damaged(dir, e),
            (e, _) => e,
        })?;
    let train_data = s.prepare(&s.train_path()?).map_err(|e| {
        match cfg.data.train.as_os_str().is_empty() {
            // Say why a file the user never named is read.
            true => RunError::Invalid(format!(
                "{e} (the embedded default's data, read because data.train is empty: messages records for the chatml template)"
            )),
            false => e,
        }
    })?;
    println!("train data: {}", train_data.summary());
    let (eval_plan, refs, eval_digest) = match s.eval_path() {
        Some(p) => {
            let d = s.prepare(&p)?;
            println!("eval data: {}", d.summary());
            if let Some(note) = d.exact_match_note().filter(|_| cfg.output.eval_accuracy) {
                println!("{note}");
            }
            let digest = Some(d.digest());
            (Some(EvalPlan::new(&s, &d.docs)?), d.references, digest)
        }
        None => (None, Vec::new(), None),
    };
    if cfg.output.eval_accuracy && eval_plan.is_some() && refs.is_empty() {
        println!(
            "note: output.eval_accuracy: the eval records hold no answers to match (data.format = \"text\"); only the eval loss is measured"
        );
    }
    let accuracy = |s: &Session, exec: &mut Executor| -> Result<Option<(usize, usize)>, RunError> {
        if !cfg.output.eval_accuracy || refs.is_empty() {
            return Ok(None);
        }
        let stop = crate::generate::stop_tokens(&s.tokenizer, &s.specials.eos);
        crate::generate::exact_match(&s.model, s.lora.as_ref(), &s.tokenizer, &stop, &refs, exec)
            .map(Some)
    };
    let show = |when: &str, a: (usize, usize)| {
        println!(
            "held-out exact match {when} training: {}/{} ({:.1}%)",
            a.0,
            a.1,
            100.0 * a.0 as f64 / a.1 as f64
        )
    };

    let rows = cfg.train.micro_batch_size;
    let row_len = s.row_len(&train_data.docs);
    // Positions restart at every sequence of a packed row: the longest
    // sequence is what reaches past the trained positions.
    let longest = train_data
        .docs
        .iter()
        .map(|d| d.ids.len())
        .max()
        .unwrap_or(0);
    let what = format!("the longest sequence's {longest} tokens");
    if let Some(note) = s.model.config.positions_note(&what, longest) {
        println!("{note}");
    }
    let pad_id = s.pad_id;
    let epoch_batches = |epoch: usize| -> Vec<Packed> {
        // A fresh order every epoch, from the seed alone (so resuming
        // rebuilds it exactly).
        let mut order: Vec<usize> = (0..train_data.docs.len()).collect();
        let mut rng =
            Rng::new(cfg.train.seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        let docs: Vec<_> = order.iter().map(|&i| train_data.docs[i].clone()).collect();
        batches(&docs, rows, row_len, cfg.data.packing, pad_id)
    };
    let mut epoch = Epoch {
        index: state0.as_ref().map_or(0, |st| st.epoch),
        micro: Vec::new(),
    };
    epoch.micro = epoch_batches(epoch.index);
    // Packing can change the batch count from one epoch's order to the
    // next: the schedule counts the first epoch's.
    let total = total_steps(cfg, epoch_batches(0).len());
    let model_digest = s.model_digest()?;
    if let (Some(dir), Some(st0)) = (&resume_from, &state0) {
        let model = (s.model_dir.as_path(), model_digest.as_str());
        let data = (s.train_path()?, &train_data);
        let epoch_len = |e: usize| match e == epoch.index {
            true => epoch.micro.len(),
            false => epoch_batches(e).len(),
        };
        checkpoint::check_resumable(dir, st0, model, data, epoch_len, total)?;
        // Other eval data changes no step, only what the eval loss means.
        if !st0.eval.is_empty() && eval_digest.as_deref() != Some(st0.eval.as_str()) {
            println!(
                "note: the eval data differs from what {} was evaluated on: eval figures before and after this resume do not compare",
                dir.display()
            );
        }
    }

    let full = cfg.adapter.method == Method::Full;
    let recompute = cfg.train.gradient_checkpointing;
    let (rec, mut stepper) = step_plan(&s, rows * row_len, true, recompute)?;
    // The device and its memory before anything is written: `--device gpu`
    // that cannot run the step, or a step too large for the memory where
    // it runs, fails here.
    let mut exec = Executor::new(cfg.train.device)?;
    exec.require_gpu(stepper.plan())?;
    exec.check_fits(stepper.plan()).map_err(|e| match e {
        graft_engine::EngineError::Memory(m) => RunError::Invalid(format!(
            "{m}, for micro-batches of {rows} x {row_len} tokens: lower train.micro_batch_size or data.max_seq_len{}",
            if recompute { "" } else { ", or turn on train.gradient_checkpointing" }
        )),
        e => e.into(),
    })?;
    let names = stepper.names();
    if names.is_empty() {
        return Err(RunError::Invalid(
            "nothing to train: the plan has no trainable tensor".into(),
        ));
    }
    let sizes: Vec<usize> = names
        .iter()
        .map(|n| {
            let g = stepper.plan().graph();
            g.shape(g.find_leaf(n).expect("named")).iter().product()
        })
        .collect();
    if let Stepper::Separate { opt, acc, .. } = &mut stepper {
        *opt = Optimizer::new(&cfg.train, &sizes)?;
        *acc = sizes.iter().map(|&n| vec![0.0; n]).collect();
    }
    // AdamW on a GPU that runs the step: its state stays there.
    let mut stepper = stepper.onto_device(&mut exec);
    let mut st = TrainerState {
        config: session::config_text(cfg),
        data: train_data.digest(),
        model: model_digest,
        eval: eval_digest.unwrap_or_default(),
        ..Default::default()
    };
    if let (Some(dir), Some(saved)) = (&resume_from, &state0) {
        let ckpt = graft_models::checkpoint::Checkpoint::open_files(
            dir,
            &[checkpoint::OPTIMIZER.to_string()],
        )?;
        // A damaged checkpoint (trained tensors or optimizer state) is named
        // here, not as a diverged step later.
        let damaged = |e| checkpoint::damaged(dir, e);
        for (n, v) in names
            .iter()
            .zip(trained(&mut s.model, s.lora.as_mut(), &names)?)
        {
            graft_models::check_finite(dir, n, v).map_err(damaged)?;
        }
        for n in ckpt.names() {
            let shape = ckpt.entry(n)?.1.shape.clone();
            let v = ckpt.load_stored(n, &shape)?.to_f32_vec()?;
            graft_models::check_finite(dir, n, &v).map_err(damaged)?;
        }
        stepper.restore(&ckpt, &names, saved.optimizer_steps, &mut exec)?;
        st = TrainerState {
            data: st.data,
            ..saved.clone()
        };
        println!("resumed from {} (step {})", dir.display(), st.step);
    }
    println!(
        "training {} tensors ({} values) for {total} steps: {} micro-batches of {rows} x {row_len} tokens per epoch, plan peak {:.1} MB",
        names.len(),
        sizes.iter().sum::<usize>(),
        epoch.micro.len(),
        stepper.plan().peak_bytes() as f64 / 1e6
    );

    println!(
        "device: {}; {}",
        exec.placement(stepper.plan()),
        stepper.state_place()
    );
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| RunError::Io(format!("{}: {e}", out_dir.display())))?;
    let mut metrics = metrics::Metrics::open(&out_dir, resume_from.is_some().then_some(st.step))?;
    let accuracy_before = if st.step == 0 {
        accuracy(&s, &mut exec)?
    } else {
        None
    };
    if let Some(a) = accuracy_before {
        show("before", a);
        metrics.log(json!({"step": 0, "accuracy": a.0 as f64 / a.1 as f64}))?;
    }
    exec.profile_ops(opts.profile);
    let bar = progress_bar(opts.progress, total, st.step);
    let say = |line: String| match &bar {
        Some(b) => b.println(line),
        None => println!("{line}"),
    };
    let mut eval_loss = None;
    let mut steps_here = 0;
    let started = Instant::now();
    let mut last_checkpoint = resume_from.clone();
    while st.step < total {
        if st.micro >= epoch.micro.len() {
            st.epoch += 1;
            st.micro = 0;
            epoch = Epoch {
                index: st.epoch,
                micro: epoch_batches(st.epoch),
            };
        }
        debug_assert_eq!(epoch.index, st.epoch);
        let t0 = Instant::now();
        let end = (st.micro + cfg.train.grad_accum).min(epoch.micro.len());
        let group = &mut epoch.micro[st.micro..end];
        let tokens: usize = group.iter().map(|p| p.tokens).sum();
        for p in group.iter_mut() {
            p.batch.seed = Tensor::from_u32(&[1], &[dropout_seed(cfg.train.seed, st.micro_step)])?;
            st.micro_step += 1;
        }
        let lr = lr_at(
            cfg.train.scheduler,
            cfg.train.lr,
            st.step,
            cfg.train.warmup_steps,
            total,
        );
        let step::Stepped { loss, norm } =
            stepper.step(&mut exec, &mut s, &rec, group, &names, lr)?;
        if !loss.is_finite() || !norm.is_finite() {
            let value = if loss.is_finite() {
                format!("{loss} but the gradient norm is {norm}")
            } else {
                loss.to_string()
            };
            let kept = match &last_checkpoint {
                Some(d) => format!(
                    "The last good checkpoint is {}; lower train.lr (or raise train.warmup_steps) and continue with --resume.",
                    d.display()
                ),
                None => "No checkpoint was saved yet; lower train.lr (or raise train.warmup_steps) and start again.".into(),
            };
            return Err(RunError::Diverged {
                step: st.step + 1,
                value,
                kept,
            });
        }
        st.micro = end;
        st.step += 1;
        st.loss = loss;
        st.optimizer_steps = stepper.optimizer_steps();
        steps_here += 1;
        let dt = t0.elapsed().as_secs_f64();
        metrics.log(json!({
            "step": st.step, "epoch": st.epoch, "loss": loss, "lr": lr, "grad_norm": norm,
            "tokens": tokens, "tokens_per_s": tokens as f64 / dt,
            "elapsed_s": started.elapsed().as_secs_f64(),
        }))?;
        if let Some(b) = &bar {
            b.set_position(st.step as u64);
            b.set_message(format!(
                "loss {loss:.4}  lr {lr:.2e}  {:.0} tok/s",
                tokens as f64 / dt
            ));
        }
        let last = st.step == total;
        if cfg.output.log_steps > 0 && (st.step.is_multiple_of(cfg.output.log_steps) || last) {
            say(format!(
                "step {}/{total}  loss {loss:.4}  lr {lr:.3e}  grad_norm {norm:.3}  {:.0} tok/s",
                st.step,
                tokens as f64 / dt
            ));
        }
        if let Some(ev) = &eval_plan {
            if (cfg.output.eval_steps > 0 && st.step.is_multiple_of(cfg.output.eval_steps)) || last
            {
                stepper.sync_to_host(&mut exec, &mut s, &names)?;
                let l = ev.loss(&s, &mut exec)?;
                eval_loss = Some(l);
                metrics.log(json!({"step": st.step, "eval_loss": l}))?;
                say(format!("step {}/{total}  eval loss {l:.4}", st.step));
            }
        }
        if opts.stop_after == Some(steps_here) && !last {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(RunError::Invalid(format!(
                "stopped after {steps_here} steps (--stop-after)"
            )));
        }
        if (cfg.output.save_steps > 0 && st.step.is_multiple_of(cfg.output.save_steps)) || last {
            stepper.sync_to_host(&mut exec, &mut s, &names)?;
            let dir = checkpoint::save(
                &out_dir,
                &st,
                cfg.output.save_total_limit,
                &mut |d: &Path| {
                    s.save_trained(d)?;
                    let state = stepper.state(&names, &mut exec)?;
                    let refs: Vec<(String, &Tensor)> =
                        state.iter().map(|(n, t)| (n.clone(), t)).collect();
                    graft_models::checkpoint::write_safetensors(
                        &d.join(checkpoint::OPTIMIZER),
                        &refs,
                        None,
                    )?;
                    Ok(())
                },
            )?;
            last_checkpoint = Some(dir);
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    if let Some(p) = exec.op_profile() {
        let evals = if eval_loss.is_some() {
            " and evaluations"
        } else {
            ""
        };
        println!(
            "time per op over {steps_here} steps{evals}:\n{}",
            p.table(30)
        );
    }
    let records = metrics::read(metrics.path())?;
    graft_models::write_atomically(
        &out_dir.join("loss.svg"),
        metrics::loss_svg(&records).as_bytes(),
    )?;
    let output = out_dir.join(if full { "model" } else { "adapter" });
    stepper.sync_to_host(&mut exec, &mut s, &names)?;
    s.check_trained()?;
    // A run into an earlier run's directory replaces its output only once
    // the new one is whole.
    graft_models::replace_dir_atomically(&output, |tmp| s.save_trained(tmp))?;
    let accuracy_after = accuracy(&s, &mut exec)?;
    if let Some(a) = accuracy_after {
        show("after", a);
        metrics.log(json!({"step": st.step, "accuracy": a.0 as f64 / a.1 as f64}))?;
    }
    Ok(RunReport {
        steps: st.step,
        loss: st.loss,
        eval_loss,
        accuracy_before,
        accuracy_after,
        output,
    })
}

fn progress_bar(show: bool, total: usize, at: usize) -> Option<indicatif::ProgressBar> {
    if !show || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return None;
    }
    let b = indicatif::ProgressBar::new(total as u64);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} step {pos}/{len}  {msg}  [{elapsed_precise} < {eta_precise}]",
        )
        .expect("a valid template"),
    );
    b.set_position(at as u64);
    Some(b)
}
