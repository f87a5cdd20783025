//! The embedded default: a tiny Llama pretrained by Graft, its tokenizer,
//! an instruction dataset with a held-out split and the run configuration,
//! compiled into the binary so `trainer run` works from any directory.
//! `trainer make-default` regenerates all of it (see README).

use crate::run::RunError;
use std::path::PathBuf;

const FILES: [(&str, &[u8]); 7] = [
    (
        "model/config.json",
        include_bytes!("../assets/default/model/config.json"),
    ),
    (
        "model/model.safetensors",
        include_bytes!("../assets/default/model/model.safetensors"),
    ),
    (
        "model/tokenizer.json",
        include_bytes!("../assets/default/model/tokenizer.json"),
    ),
    (
        "model/tokenizer_config.json",
        include_bytes!("../assets/default/model/tokenizer_config.json"),
    ),
    (
        "data/train.jsonl",
        include_bytes!("../assets/default/data/train.jsonl"),
    ),
    (
        "data/eval.jsonl",
        include_bytes!("../assets/default/data/eval.jsonl"),
    ),
    ("run.toml", include_bytes!("../assets/default/run.toml")),
];

/// The run configuration of the embedded default (over defaults.toml).
pub fn run_config() -> &'static str {
    std::str::from_utf8(FILES[6].1).expect("run.toml is UTF-8")
}

/// The embedded files, extracted once into the cache (keyed by their hash,
/// written to a temporary directory and renamed, so a half-written copy is
/// never used).
fn extracted() -> Result<PathBuf, RunError> {
    if FILES.iter().any(|(_, b)| b.is_empty()) {
        return Err(RunError::Invalid(
            "this build has no embedded default model: set model.path (or regenerate it with `trainer make-default`)".into(),
        ));
    }
    let parts: Vec<&[u8]> = FILES.iter().map(|(_, b)| *b).collect();
    let key = graft_engine::kernels::cache::fnv1a(&parts);
    let root = graft_engine::kernels::cache::cache_root().unwrap_or_else(std::env::temp_dir);
    let dir = root.join(format!("default-{key:016x}"));
    if dir.is_dir() {
        return Ok(dir);
    }
    let io = |p: &std::path::Path, e: std::io::Error| RunError::Io(format!("{}: {e}", p.display()));
    // Unique per process and call: tests extract from several threads.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = root.join(format!(
        ".default-{key:016x}.tmp{}-{nanos}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, bytes) in FILES {
        let path = tmp.join(name);
        std::fs::create_dir_all(path.parent().expect("files are in folders"))
            .map_err(|e| io(&path, e))?;
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process extracted it first.
        if !dir.is_dir() {
            return Err(io(&dir, e));
        }
    }
    Ok(dir)
}

/// The default model's directory.
pub fn model_dir() -> Result<PathBuf, RunError> {
    Ok(extracted()?.join("model"))
}

/// The default dataset's directory (train.jsonl, eval.jsonl).
pub fn data_dir() -> Result<PathBuf, RunError> {
    Ok(extracted()?.join("data"))
}
