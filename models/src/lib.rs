//! graft-models: Hugging Face configs, the Llama family as graph recorders,
//! checkpoint I/O (safetensors, single and sharded) and LoRA adapters in
//! PEFT's format.

pub mod causal_lm;
pub mod checkpoint;
pub mod config;
pub mod dora;
mod export;
pub mod lora;
pub mod quantized;

pub use causal_lm::{Batch, CausalLm, KvCache, LoadOptions, RecordOptions, Recorded};
pub use config::{Arch, ModelConfig};
pub use lora::{Lora, LoraConfig, LoraModule, Targets};

use std::path::{Path, PathBuf};

/// Every error names the file and the tensor or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    #[error("{}: architecture `{arch}` is not supported (supported: {})", path.display(), config::Arch::SUPPORTED.join(", "))]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{}: {msg}", path.display())]
    Safetensors { path: PathBuf, msg: String },
    #[error("{}: tensor `{name}` is missing from the checkpoint", dir.display())]
    MissingTensor { name: String, dir: PathBuf },
    #[error("{}: tensor `{name}` has shape {got:?} but config.json implies {want:?}", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{}: {msg}", path.display())]
    Adapter { path: PathBuf, msg: String },
    #[error("{}: tensor `{name}` holds {value} at index {index}", path.display())]
    NonFinite {
        path: PathBuf,
        name: String,
        index: usize,
        value: f32,
    },
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Engine(#[from] graft_engine::EngineError),
    #[error(transparent)]
    Ir(#[from] graft_engine::ir::IrError),
}

impl ModelError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            msg: e.to_string(),
        }
    }
}

/// An engine error's message without its kind, for a sentence that names
/// the tensor already ("tensor `w`: cannot quantize ...").
pub(crate) fn tensor_msg(e: &graft_engine::EngineError) -> String {
    match e {
        graft_engine::EngineError::Tensor(m) => m.clone(),
        e => e.to_string(),
    }
}

/// A note for the user when a checkpoint in `dir` holds tensors the model
/// does not read (`unexpected`, as [`ModelConfig::unexpected`] lists them).
pub fn unexpected_note(dir: &Path, unexpected: &[String]) -> Option<String> {
    let first = unexpected.first()?;
    Some(format!(
        "note: {}: {} tensor(s) of the checkpoint are not part of the model config.json describes, e.g. `{first}`: left unread (do num_hidden_layers and the architecture match the weights?)",
        dir.display(),
        unexpected.len()
    ))
}

/// Fails naming `name` (of the file `path`) and its first NaN or infinite
/// value.
pub fn check_finite(path: &Path, name: &str, v: &[f32]) -> Result<(), ModelError> {
    match v.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(ModelError::NonFinite {
            path: path.to_path_buf(),
            name: name.to_string(),
            index,
            value: v[index],
        }),
        None => Ok(()),
    }
}

/// Makes the directory `dir` whole or not at all: `fill` writes into a
/// temporary sibling, renamed to `dir` once it succeeded (and removed if it
/// failed). `dir` must not exist or be empty: files left there from before
/// (another model's shards) would be read with the new ones.
pub fn write_dir_atomically<T>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    if std::fs::read_dir(dir).is_ok_and(|mut e| e.next().is_some()) {
        return Err(ModelError::Input(format!(
            "{}: already exists and is not empty: give a new directory, or remove it",
            dir.display()
        )));
    }
    replace_dir_atomically(dir, fill)
}

/// [`write_dir_atomically`] over whatever `dir` holds: the old directory
/// stays whole until the new one is complete, then the two are swapped by
/// renames (the old one moved aside to `.NAME.old<pid>` and removed).
/// Temporaries are `.NAME.tmp<pid>` and `.NAME.old<pid>` next to `dir`.
pub fn replace_dir_atomically<T, E: From<ModelError>>(
    dir: &Path,
    fill: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    if dir.exists() && !dir.is_dir() {
        return Err(
            ModelError::Input(format!("{}: is a file, not a directory", dir.display())).into(),
        );
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ModelError::Input(format!("{}: not a directory name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    let done = fill(&tmp).and_then(|v| {
        let io = |e| ModelError::io(dir, e);
        // An empty `dir` gives way; a full one is moved aside first.
        let _ = std::fs::remove_dir(dir);
        if dir.exists() {
            let old = parent.join(format!(".{name}.old{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&old);
            std::fs::rename(dir, &old).map_err(io)?;
            std::fs::rename(&tmp, dir).map_err(io)?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&tmp, dir).map_err(io)?;
        }
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(v)
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    done
}

/// Writes `bytes` to `path` through a temporary file in the same directory
/// and a rename, so a reader never sees a partial file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    write_atomically_with(path, &mut |w| w.write_all(bytes))
}

/// [`write_atomically`] with the content streamed by `fill`.
pub fn write_atomically_with(
    path: &Path,
    fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(), ModelError> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let mut write = || -> std::io::Result<()> {
        let file = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::new(file);
        fill(&mut w)?;
        w.flush()?;
        w.get_ref().sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}
