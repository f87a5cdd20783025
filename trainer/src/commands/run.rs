//! `trainer run`: train as a configuration says (the embedded default
//! without one).

use super::CliError;
use graft_trainer::config::Config;
use graft_trainer::run::{train, RunOptions};
use std::path::PathBuf;

/// Where the configuration comes from (shared by `run` and `eval`).
#[derive(clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration (every key and its default: `trainer run --help`).
    /// Without one, the embedded default: a tiny Llama instruction-tuned
    /// with QLoRA on a synthetic dataset, with held-out accuracy before and
    /// after (its settings: trainer/assets/default/run.toml). Without one but
    /// with `--set model.path=DIR`, the defaults below and the sets apply.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override one key, e.g. `--set train.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    sets: Vec<String>,
    /// Where the step runs: cpu, gpu or auto (the same as `--set
    /// train.device=...`).
    #[arg(long, value_name = "cpu|gpu|auto")]
    device: Option<String>,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config, CliError> {
        let mut sets = self.sets.clone();
        sets.extend(self.device.iter().map(|d| format!("train.device={d}")));
        load_config(self.config.as_deref(), &sets)
    }
}

#[derive(clap::Args)]
#[command(after_long_help = graft_trainer::config::DEFAULTS)]
pub struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Continue from the newest checkpoint in output.dir.
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps without the final save, as if killed (for
    /// testing resumption).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// Time every op of the training steps and print where the time went
    /// (seconds, share and calls per kind of op, fusion groups spelled out).
    #[arg(long)]
    profile: bool,
}

/// The configuration: the file's and the sets, over the embedded default's
/// run.toml unless they name a model (`model.path`), else over
/// defaults.toml alone. (A file that only sets `[train]` keys then tunes
/// the embedded default rather than mixing it with defaults.toml's data
/// format.)
fn load_config(file: Option<&std::path::Path>, sets: &[String]) -> Result<Config, CliError> {
    let names_model = |table: &toml::Table| {
        table
            .get("model")
            .and_then(|m| m.get("path"))
            .and_then(|p| p.as_str())
            .is_some_and(|p| !p.is_empty())
    };
    let set_names_model = sets.iter().any(|s| {
        s.split_once('=').is_some_and(|(k, v)| {
            k.trim() == "model.path" && !v.trim().trim_matches('"').is_empty()
        })
    });
    let text = match file {
        Some(path) => Some((
            std::fs::read_to_string(path).map_err(|e| graft_trainer::config::ConfigError {
                origin: path.display().to_string(),
                msg: e.to_string(),
            })?,
            path.display().to_string(),
        )),
        None => None,
    };
    // A file that does not parse names no model here; merging reports why.
    let file_names_model = text
        .as_ref()
        .and_then(|(t, _)| t.parse::<toml::Table>().ok())
        .is_some_and(|t| names_model(&t));
    let mut files: Vec<(&str, &str)> = Vec::new();
    if !set_names_model && !file_names_model {
        files.push((
            graft_trainer::embedded::run_config(),
            "embedded default run.toml",
        ));
    }
    if let Some((t, name)) = &text {
        files.push((t, name));
    }
    Ok(Config::from_texts(&files, sets)?)
}

pub fn run(args: Args) -> Result<(), CliError> {
    let cfg = args.config.load()?;
    let opts = RunOptions {
        resume: args.resume,
        stop_after: args.stop_after,
        progress: true,
        profile: args.profile,
    };
    let started = std::time::Instant::now();
    let r = train(&cfg, &opts)?;
    println!(
        "done: {} steps, final loss {:.4}{} in {:.1} s; wrote {} (metrics.jsonl, loss.svg in {})",
        r.steps,
        r.loss,
        r.eval_loss
            .map_or(String::new(), |l| format!(", eval loss {l:.4}")),
        started.elapsed().as_secs_f64(),
        r.output.display(),
        cfg.output.dir.display()
    );
    Ok(())
}
