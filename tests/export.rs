//! Writing models back out: a full save reloads to the same weights, and an
//! adapter merged into its base (plain or NF4) gives the logits of base +
//! adapter.

mod common;

use common::{fixture_dir, logits, rel_l2};
use graft::ir::DType;
use graft::models::{CausalLm, LoadOptions, Lora};
use std::path::PathBuf;

fn tmp(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("graft-export-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    p
}

const IDS: [i32; 12] = [1, 17, 200, 3, 45, 99, 128, 7, 7, 250, 31, 64];

#[test]
fn a_saved_model_reloads_to_the_same_weights() {
    let model = CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap();
    let out = tmp("save");
    model.save(&out, DType::F32).unwrap();
    let again = CausalLm::load(&out, DType::F32).unwrap();
    assert_eq!(model.weights().len(), again.weights().len());
    for (name, t) in model.weights() {
        assert_eq!(t.bytes(), again.weight(name).unwrap().bytes(), "{name}");
    }
    // Saving over the model being read is refused.
    assert!(model
        .save(&fixture_dir("llama").join("model"), DType::F32)
        .is_err());
}

#[test]
fn a_merged_adapter_gives_the_logits_of_base_plus_adapter() {
    let dir = fixture_dir("llama");
    let mut model = CausalLm::load(&dir.join("model"), DType::F32).unwrap();
    let lora = Lora::load(&dir.join("adapter"), &model.config).unwrap();
    let want = logits(&model, Some(&lora), &IDS);
    let base = logits(&model, None, &IDS);
    lora.merge_into(&mut model).unwrap();
    let out = tmp("merge");
    model.save(&out, DType::F32).unwrap();
    let merged = CausalLm::load(&out, DType::F32).unwrap();
    let got = logits(&merged, None, &IDS);
    let err = rel_l2(&got, &want);
    assert!(err < 1e-5, "merged vs adapter: rel L2 {err:e}");
    assert!(
        rel_l2(&base, &want) > 1e-3,
        "the adapter changes the logits"
    );
}

#[test]
fn merging_into_an_nf4_base_dequantizes_and_writes_bf16() {
    let dir = fixture_dir("llama");
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize: Some(64),
    };
    let mut model = CausalLm::load_with(&dir.join("model"), &opts).unwrap();
    let lora = Lora::load(&dir.join("adapter"), &model.config).unwrap();
    let want = logits(&model, Some(&lora), &IDS);
    lora.merge_into(&mut model).unwrap();
    let out = tmp("merge-nf4");
    model.save(&out, DType::BF16).unwrap();
    let config = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(!config.contains("quantization_config"));
    let ckpt = graft::models::checkpoint::Checkpoint::open(&out).unwrap();
    let (_, e) = ckpt
        .entry("model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(
        graft::models::checkpoint::dtype_of(e.dtype),
        Some(DType::BF16)
    );
    let merged = CausalLm::load(&out, DType::F32).unwrap();
    let got = logits(&merged, None, &IDS);
    // bf16 storage of the merged weights: ~3 significant digits.
    let err = rel_l2(&got, &want);
    assert!(err < 1e-2, "merged NF4 vs NF4 + adapter: rel L2 {err:e}");
}
