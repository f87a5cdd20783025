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

#[test]
fn config_values_that_give_nan_are_refused_by_key() {
    for (key, value) in [
        ("rope_theta", serde_json::json!(0.0)),
        ("rms_norm_eps", serde_json::json!(-1.0)),
    ] {
        let dir = copy_model("llama", &format!("cfg-{key}"));
        edit_config(&dir, |c| c[key] = value);
        let e = load_err(&dir);
        assert!(
            e.contains("config.json") && e.contains(&format!("key `{key}` must be positive")),
            "{e}"
        );
    }
}

/// An adapter with NaN in it, a DoRA magnitude under `use_dora: false`, a
/// rank disagreeing with `r`, or layers the model lacks: each named.
#[test]
fn adapter_values_and_shapes_that_do_not_fit_are_named() {
    let src = fixture_dir("llama").join("adapter");
    let model = CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap();
    let fresh = |tag: &str| {
        let dir = std::env::temp_dir().join(format!("graft-bad-ad-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        dir
    };
    let err = |dir: &Path, config: &graft::models::ModelConfig| {
        Lora::load(dir, config).map(|_| ()).unwrap_err().to_string()
    };
    // NaN over every value past the header.
    let nan = fresh("nan");
    let weights = nan.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + n..].fill(0xff);
    std::fs::write(&weights, bytes).unwrap();
    let e = err(&nan, &model.config);
    assert!(
        e.contains("holds NaN at index 0") && e.contains(".lora_"),
        "{e}"
    );
    // Another rank than adapter_config.json's r.
    let rank = fresh("rank");
    let p = rank.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let r = cfg["r"].as_u64().unwrap();
    cfg["r"] = (r + 1).into();
    std::fs::write(&p, cfg.to_string()).unwrap();
    let e = err(&rank, &model.config);
    assert!(
        e.contains(&format!("r = {} (adapter_config.json)", r + 1)),
        "{e}"
    );
    cfg["r"] = serde_json::json!(-4);
    std::fs::write(&p, cfg.to_string()).unwrap();
    assert!(err(&rank, &model.config).contains("key `r` must be positive, got -4"));
    // A DoRA adapter whose config says it is not DoRA.
    let dora = std::env::temp_dir().join(format!("graft-bad-ad-dora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dora);
    std::fs::create_dir_all(&dora).unwrap();
    let dora_src = fixture_dir("dora").join("adapter");
    std::fs::copy(
        dora_src.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dora_src.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["use_dora"] = false.into();
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    let e = err(&dora, &model.config);
    assert!(
        e.contains("is a DoRA magnitude, but adapter_config.json has `use_dora` false"),
        "{e}"
    );
    // An adapter for more layers than the model has.
    let mut one_layer = model.config.clone();
    one_layer.num_layers = 1;
    let e = err(&fresh("layers"), &one_layer);
    assert!(
        e.contains("is for layer 1, but the model has 1 layers"),
        "{e}"
    );
}

/// A pre-quantized checkpoint whose scales hold NaN is named at load, as
/// is a quant state restoring a non-float dtype.
#[test]
fn nf4_scales_holding_nan_are_named() {
    let dir = copy_model("llama_nf4", "nf4-nan");
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight.nested_absmax";
    let offs = &header[name]["data_offsets"];
    let (s, e) = (
        offs[0].as_u64().unwrap() as usize,
        offs[1].as_u64().unwrap() as usize,
    );
    bytes[8 + n + s..8 + n + e].fill(0xff);
    std::fs::write(&path, bytes).unwrap();
    let e = match CausalLm::load(&dir, DType::F32) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(name) && e.contains("holds NaN"), "{e}");
}

/// Tensors the model does not read are listed (fewer layers in config.json
/// than in the weights), and none in any fixture: NF4 parts, tied heads
/// and the like are not counted.
#[test]
fn tensors_the_config_leaves_unread_are_listed() {
    for fixture in ["llama", "llama_nf4", "gemma", "mistral", "qwen2"] {
        let m = CausalLm::load(&fixture_dir(fixture).join("model"), DType::F32).unwrap();
        assert_eq!(m.unexpected, Vec::<String>::new(), "{fixture}");
    }
    let dir = copy_model("llama", "fewer-layers");
    edit_config(&dir, |c| c["num_hidden_layers"] = serde_json::json!(1));
    let m = CausalLm::load(&dir, DType::F32).unwrap();
    assert!(!m.unexpected.is_empty());
    assert!(m
        .unexpected
        .iter()
        .all(|n| n.starts_with("model.layers.1.")));
    let note = graft::models::unexpected_note(&dir, &m.unexpected).unwrap();
    assert!(note.contains("num_hidden_layers"), "{note}");
}

#[test]
fn header_whose_shape_disagrees_with_its_bytes_names_the_tensor() {
    let dir = copy_model("llama", "hdr-shape");
    edit_header(&dir.join("model.safetensors"), |h| {
        let info = h["model.norm.weight"].as_object_mut().unwrap();
        info.insert("shape".into(), serde_json::json!([3]));
    });
    let e = load_err(&dir);
    assert!(
        e.contains("model.safetensors") && e.contains("tensor `model.norm.weight`"),
        "{e}"
    );
}
