//! Training checkpoints: `OUT/checkpoint-N/` holds the trained weights (a
//! PEFT adapter, or the whole model for full fine-tuning), the optimizer
//! state, and `trainer_state.json` (step, data position, the configuration).
//! Each is written into a temporary directory and renamed into place, so a
//! kill at any moment leaves every `checkpoint-N` complete.

use super::RunError;
use crate::data::prepare::Prepared;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the run is: enough to continue it exactly.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Data position: the epoch and the next micro-batch in it.
    pub epoch: usize,
    pub micro: usize,
    /// Micro-batches done over the whole run (dropout seeds derive from it).
    pub micro_step: u64,
    /// The optimizer's own step count (AdamW's bias correction).
    pub optimizer_steps: u64,
    /// Loss of the last step.
    pub loss: f32,
    /// The configuration, as TOML, that the run must be resumed with.
    pub config: String,
    /// The training data's `Prepared::digest` (empty in
    /// checkpoints made before it was kept).
    #[serde(default)]
    pub data: String,
    /// The base model's `Session::model_digest` (empty in older ones).
    #[serde(default)]
    pub model: String,
    /// The eval data's `Prepared::digest` (empty without eval data, and in
    /// older checkpoints).
    #[serde(default)]
    pub eval: String,
}

pub const STATE: &str = "trainer_state.json";
pub const OPTIMIZER: &str = "optimizer.safetensors";

fn io(path: &Path, e: std::io::Error) -> RunError {
    RunError::Io(format!("{}: {e}", path.display()))
}

/// N of a `checkpoint-N` directory.
fn step_of(dir: &Path) -> Option<usize> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("checkpoint-")?
        .parse()
        .ok()
}

/// `OUT/checkpoint-N` directories, oldest first.
pub fn list(out: &Path) -> Result<Vec<(usize, PathBuf)>, RunError> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(out) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(io(out, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| io(out, e))?.path();
        if let Some(step) = step_of(&path) {
            // Saves are renamed into place whole: one without its state
            // was damaged afterwards, and resuming past it would be silent.
            if !path.join(STATE).is_file() {
                return Err(RunError::Invalid(format!(
                    "{} has no {STATE}: the checkpoint is damaged; delete it to resume from an earlier one",
                    path.display()
                )));
            }
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes what a killed save left behind: the temporaries of
/// `graft_models::replace_dir_atomically` for checkpoints and the final
/// adapter or model.
pub fn remove_partial(out: &Path) {
    for entry in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if [".checkpoint-", ".adapter.", ".model."]
            .iter()
            .any(|p| name.starts_with(p))
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Fails unless the checkpoint `dir` (whose state is `st`) can continue
/// this run exactly: the base model (`model_dir`, its digest) and the
/// training data (`path`, prepared) are the ones it was made with; its
/// state names its own step, as many optimizer steps, a micro-batch of its
/// epoch (`epoch_len(e)` micro-batches in epoch `e`) and the micro-batches
/// done before it; and it is not past the run's `total` steps.
pub fn check_resumable(
    dir: &Path,
    st: &TrainerState,
    (model_dir, model): (&Path, &str),
    (path, data): (PathBuf, &Prepared),
    epoch_len: impl Fn(usize) -> usize,
    total: usize,
) -> Result<(), RunError> {
    let fail = |msg: String| {
        Err(RunError::Invalid(format!(
            "--resume: {}: {msg}",
            dir.display()
        )))
    };
    // Checked first: another model (its tokenizer) also changes the data's
    // tokens, and other data the epoch's length.
    if !st.model.is_empty() && st.model != model {
        return fail(format!(
            "made with another base model than {} holds now (its weights or config.json changed); resume with the same model files, or set output.dir to start a new run",
            model_dir.display()
        ));
    }
    if !st.data.is_empty() && st.data != data.digest() {
        return fail(format!(
            "made with other training data than {} gives now ({}); resume with the same data, or set output.dir to start a new run",
            path.display(),
            data.summary()
        ));
    }
    if step_of(dir) != Some(st.step) {
        return fail(format!(
            "{STATE} says step {}: the file is damaged",
            st.step
        ));
    }
    let damaged = |what: String| fail(format!("{STATE} says {what}: the file is damaged"));
    if st.optimizer_steps != st.step as u64 {
        return damaged(format!(
            "{} optimizer steps at step {}",
            st.optimizer_steps, st.step
        ));
    }
    // Every epoch takes a step at least (bounds the count below).
    if st.epoch > st.step {
        return damaged(format!("epoch {} at step {}", st.epoch, st.step));
    }
    let len = epoch_len(st.epoch);
    if st.micro > len {
        return damaged(format!(
            "micro-batch {} of epoch {}, which has {len}",
            st.micro, st.epoch
        ));
    }
    // The dropout masks derive from the micro-batches done before.
    let done = (0..st.epoch).map(&epoch_len).sum::<usize>() + st.micro;
    if st.micro_step != done as u64 {
        return damaged(format!(
            "{} micro-batches done, where epoch {} micro-batch {} follows {done}",
            st.micro_step, st.epoch, st.micro
        ));
    }
    if st.step > total {
        return fail(format!(
            "at step {}, past this run's {total} steps (train.max_steps, or train.epochs): raise them to continue it",
            st.step
        ));
    }
    Ok(())
}

/// What a resume says of a checkpoint's tensor holding NaN or inf
/// ([`graft_models::ModelError::NonFinite`]); other errors pass.
pub fn damaged(dir: &Path, e: graft_models::ModelError) -> RunError {
    match e {
        graft_models::ModelError::NonFinite {
            name, index, value, ..
        } => RunError::Invalid(format!(
            "--resume: {}: tensor `{name}` holds {value} at index {index}: the checkpoint is damaged; resume from an earlier one (delete this directory)",
            dir.display()
        )),
        e => e.into(),
    }
}

pub fn read_state(dir: &Path) -> Result<TrainerState, RunError> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| RunError::Io(format!("{}: {e}", path.display())))
}

/// Writes checkpoint `state.step` under `out`: `fill` writes the weights and
/// optimizer files into the directory it is given, then the state goes last
/// and the directory is renamed into place. Keeps the newest `keep` (0: all).
pub fn save(
    out: &Path,
    state: &TrainerState,
    keep: usize,
    fill: &mut dyn FnMut(&Path) -> Result<(), RunError>,
) -> Result<PathBuf, RunError> {
    let dst = out.join(format!("checkpoint-{}", state.step));
    // Same step saved again (a resumed run) replaces the old one.
    graft_models::replace_dir_atomically(&dst, |tmp| {
        fill(tmp)?;
        let text = serde_json::to_string_pretty(state).expect("the state always serialises");
        graft_models::write_atomically(&tmp.join(STATE), text.as_bytes())?;
        Ok::<_, RunError>(())
    })?;
    if keep > 0 {
        let all = list(out)?;
        for (_, old) in &all[..all.len().saturating_sub(keep)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(dst)
}
