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
