//! Bad checkpoints and adapters: each gives one clear error naming the file
//! and the tensor or key, never a panic.

mod common;

use common::fixture_dir;
use graft::ir::DType;
use graft::models::{CausalLm, Lora, LoraConfig, ModelError, Targets};
use std::path::{Path, PathBuf};

/// A private copy of a fixture's model directory.
fn copy_model(fixture: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("graft-bad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(fixture_dir(fixture).join("model")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> String {
    match CausalLm::load(dir, DType::F32) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites a safetensors file's header with `f` (data kept as is).
fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    f(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn missing_safetensors_names_the_file() {
    let dir = copy_model("llama", "missing");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_names_the_file() {
    let dir = copy_model("llama", "truncated");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    for keep in [bytes.len() - 100, 40, 5, 0] {
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("model.safetensors") && e.contains("truncated"),
            "keep {keep}: {e}"
        );
    }
}

#[test]
fn header_lying_about_offsets_names_the_tensor() {
    let dir = copy_model("llama", "offsets");
    edit_header(&dir.join("model.safetensors"), |h| {
        let info = h["model.norm.weight"].as_object_mut().unwrap();
        let offs = info["data_offsets"].as_array().unwrap();
        let (s, e) = (offs[0].as_u64().unwrap(), offs[1].as_u64().unwrap());
        info.insert("data_offsets".into(), serde_json::json!([s + 4, e + 4]));
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("offsets"),
        "{e}"
    );
}

#[test]
fn shape_disagreeing_with_config_names_tensor_and_file() {
    let dir = copy_model("llama", "shape");
    edit_config(&dir, |c| c["intermediate_size"] = serde_json::json!(128));
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.0.mlp.gate_proj.weight"),
        "{e}"
    );
    assert!(e.contains("[96, 64]") && e.contains("[128, 64]"), "{e}");
}

#[test]
fn unknown_architecture_names_it_and_the_file() {
    let dir = copy_model("llama", "arch");
    edit_config(&dir, |c| {
        c["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    let e = load_err(&dir);
    assert!(
        e.contains("config.json")
            && e.contains("FalconForCausalLM")
            && e.contains("LlamaForCausalLM"),
        "{e}"
    );
}

#[test]
fn missing_config_key_names_the_key() {
    let dir = copy_model("llama", "key");
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let e = load_err(&dir);
    assert!(
        e.contains("config.json") && e.contains("hidden_size"),
        "{e}"
    );
}

#[test]
fn missing_tensor_names_the_tensor() {
    let dir = copy_model("llama", "tensor");
    // Renaming keeps the file valid but the tensor absent.
    edit_header(&dir.join("model.safetensors"), |h| {
        let v = h.remove("model.norm.weight").unwrap();
        h.insert("model.norm.weights".into(), v);
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.norm.weight`") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn missing_shard_names_the_shard() {
    let dir = copy_model("mistral", "shard");
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
}

#[test]
fn target_module_matching_nothing_is_an_error() {
    let model = CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap();
    for (targets, want) in [
        (vec!["q_proj", "q_prj"], "\"q_prj\" matches no module"),
        (vec!["lm_head"], "not supported"),
    ] {
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Targets::List(targets.iter().map(|s| s.to_string()).collect()),
            use_rslora: false,
            use_dora: false,
        };
        match Lora::init(cfg, &model.config, 0) {
            Err(e @ ModelError::Adapter { .. }) => {
                let e = e.to_string();
                assert!(e.contains("target_modules") && e.contains(want), "{e}")
            }
            other => panic!("expected an adapter error, got {:?}", other.map(|_| ())),
        }
    }
}

#[test]
fn adapter_with_unknown_target_or_stray_tensor_is_an_error() {
    let src = fixture_dir("llama").join("adapter");
    let dir = std::env::temp_dir().join(format!("graft-bad-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let model = CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap();
    // Fewer targets than tensors: a stray tensor must not be silently ignored.
    let p = dir.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg["target_modules"] = serde_json::json!(["q_proj"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = Lora::load(&dir, &model.config).unwrap_err().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("belongs to no target module"),
        "{e}"
    );
    cfg["target_modules"] = serde_json::json!(["qq_proj"]);
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = Lora::load(&dir, &model.config).unwrap_err().to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("qq_proj"),
        "{e}"
    );
    // PEFT options Graft would get wrong are refused by name.
    cfg["target_modules"] = serde_json::json!("all-linear");
    for (key, value) in [
        ("lora_bias", serde_json::json!(true)),
        ("exclude_modules", serde_json::json!(["q_proj"])),
        ("layers_to_transform", serde_json::json!([0])),
    ] {
        let mut c = cfg.clone();
        c[key] = value;
        std::fs::write(&p, c.to_string()).unwrap();
        let e = Lora::load(&dir, &model.config).unwrap_err().to_string();
        assert!(e.contains(&format!("key `{key}`")), "{key}: {e}");
    }
}
