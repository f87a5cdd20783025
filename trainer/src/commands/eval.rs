//! `trainer eval`: eval loss and exact-match accuracy of a model (with an
//! adapter) on a configuration's eval set.

use super::CliError;
use graft_engine::Executor;
use graft_trainer::generate::{exact_match, stop_tokens};
use graft_trainer::run::session::Session;
use graft_trainer::run::{EvalPlan, RunError};
use std::path::PathBuf;

#[derive(clap::Args)]
#[command(after_long_help = graft_trainer::config::DEFAULTS)]
pub struct Args {
    #[command(flatten)]
    config: super::run::ConfigArgs,
    /// PEFT LoRA/DoRA adapter to evaluate (without one: the base model).
    #[arg(long)]
    adapter: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<(), CliError> {
    let cfg = args.config.load()?;
    let s = Session::open(&cfg, args.adapter.as_deref())?;
    let path = s.eval_path().ok_or_else(|| {
        RunError::Invalid("key `data.eval` is empty: give the eval JSONL file".into())
    })?;
    let data = s.prepare(&path)?;
    println!("eval data: {}", data.summary());
    if let Some(note) = data.exact_match_note() {
        println!("{note}");
    }
    let eval = EvalPlan::new(&s, &data.docs)?;
    let mut exec = Executor::new(s.cfg.train.device)?;
    exec.require_gpu(eval.plan())?;
    exec.check_fits(eval.plan())?;
    println!("device: {}", exec.placement(eval.plan()));
    let loss = eval.loss(&s, &mut exec)?;
    if !loss.is_finite() {
        return Err(CliError::Usage(format!(
            "the eval loss is {loss}: the model's weights (or the adapter's) hold NaN or inf"
        )));
    }
    println!("eval loss {loss:.4}");
    if !data.references.is_empty() {
        let stop = stop_tokens(&s.tokenizer, &s.specials.eos);
        let (ok, n) = exact_match(
            &s.model,
            s.lora.as_ref(),
            &s.tokenizer,
            &stop,
            &data.references,
            &mut exec,
        )?;
        println!(
            "exact match {ok}/{n} ({:.1}%)",
            100.0 * ok as f64 / n as f64
        );
    }
    Ok(())
}
