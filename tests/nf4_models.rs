//! NF4 models: pre-quantized bitsandbytes checkpoints load as saved and give
//! the oracle's logits; quantize-on-load gives the same weights as
//! quantizing each tensor, and the NF4 model computes exactly what a dense
//! model on the dequantized weights computes, LoRA gradients included.

mod common;

use common::{fixture_dir, logits, rel_l2, Expected};
use graft::engine::{compile_training, CpuExecutor, Tensor};
use graft::ir::DType;
use graft::models::checkpoint::{dtype_of, write_safetensors};
use graft::models::{Batch, CausalLm, LoadOptions, Lora, RecordOptions};
use std::path::{Path, PathBuf};

fn tmp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("graft-nf4-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn prequantized_bitsandbytes_checkpoint_matches_the_oracle() {
    let dir = fixture_dir("llama_nf4");
    let exp = Expected::load("llama_nf4");
    let model = CausalLm::load(&dir.join("model"), DType::F32).unwrap();
    assert!(model
        .weight("model.layers.0.mlp.down_proj.weight")
        .unwrap()
        .dtype()
        .is_nf4());
    assert_eq!(
        model.weight("model.embed_tokens.weight").unwrap().dtype(),
        DType::F32
    );
    let e = rel_l2(
        &logits(&model, None, &exp.i32("input_ids")),
        &exp.f32("logits"),
    );
    assert!(e < 1e-5, "logits rel L2 {e:e}");
}

/// Writes `model`'s weights, NF4 ones dequantized to f32, as a dense checkpoint.
fn write_dequantized(model: &CausalLm, src: &Path, dst: &Path) {
    let mut tensors = Vec::new();
    for (name, _) in model.config.expected_tensors() {
        let t = model.weight(&name).unwrap();
        let dense = Tensor::from_f32(t.shape(), &t.to_f32_vec().unwrap()).unwrap();
        tensors.push((name, dense));
    }
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&dst.join("model.safetensors"), &refs, None).unwrap();
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
}

#[test]
fn quantize_on_load_equals_dense_on_the_dequantized_weights_forward_and_backward() {
    let src = fixture_dir("llama").join("model");
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize: Some(64),
    };
    let nf4 = CausalLm::load_with(&src, &opts).unwrap();
    let dense_src = CausalLm::load(&src, DType::F32).unwrap();
    let name = "model.layers.1.self_attn.o_proj.weight";
    let want = dense_src.weight(name).unwrap().quantize_nf4(64).unwrap();
    assert_eq!(
        nf4.weight(name).unwrap().bytes(),
        want.bytes(),
        "quantized while loading = quantized after"
    );

    let dir = tmp_dir("dense");
    write_dequantized(&nf4, &src, &dir);
    let dense = CausalLm::load(&dir, DType::F32).unwrap();
    let lora = Lora::load(&fixture_dir("llama").join("adapter"), &nf4.config).unwrap();
    let ids: Vec<i32> = (0..12).map(|i| (i * 37 + 5) % 256).collect();
    let batch = Batch::new(&[&ids], None, 0).unwrap();
    let mut results = Vec::new();
    for model in [&nf4, &dense] {
        let opts = RecordOptions {
            lora: Some(&lora),
            train_lora: true,
            loss: true,
            dropout: false,
            ..Default::default()
        };
        let rec = model.record(ids.len(), opts).unwrap();
        let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[rec.logits]).unwrap();
        assert_eq!(
            plan.grads().len(),
            2 * lora.modules.len(),
            "only the adapter is trained"
        );
        let out = CpuExecutor::new()
            .run(&plan, &rec.feeds(model, Some(&lora), &batch).unwrap())
            .unwrap();
        results.push(
            out.iter()
                .map(|t| t.to_f32_vec().unwrap())
                .collect::<Vec<_>>(),
        );
    }
    for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
        let e = rel_l2(a, b);
        assert!(
            e < 1e-5,
            "output {i} (0 loss, 1 logits, then gradients): rel L2 {e:e}"
        );
    }
    // And the NF4 model is not the unquantized one.
    let e = rel_l2(&results[0][1], &logits(&dense_src, Some(&lora), &ids));
    assert!(e > 1e-3, "quantization changed nothing? {e:e}");
}

/// Copies the llama_nf4 fixture, letting `edit` change tensors by name.
fn edited_copy(tag: &str, edit: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>) -> PathBuf {
    let src = fixture_dir("llama_nf4").join("model");
    let dst = tmp_dir(tag);
    std::fs::copy(src.join("config.json"), dst.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = dtype_of(view.dtype()).unwrap();
        let mut data = view.data().to_vec();
        let mut shape = view.shape().to_vec();
        if let Some(new) = edit(&name, data.clone()) {
            data = new;
            shape = vec![data.len() / dtype.bytes(1)];
        }
        tensors.push((name, Tensor::from_bytes(&shape, dtype, &data).unwrap()));
    }
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&dst.join("model.safetensors"), &refs, None).unwrap();
    dst
}

fn load_err(dir: &Path) -> String {
    match CausalLm::load(dir, DType::F32) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    }
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

fn edit_state(
    key: &str,
    value: serde_json::Value,
) -> impl Fn(&str, Vec<u8>) -> Option<Vec<u8>> + '_ {
    move |name, data| {
        (name == format!("{Q}.quant_state.bitsandbytes__nf4")).then(|| {
            let mut state: serde_json::Value = serde_json::from_slice(&data).unwrap();
            state[key] = value.clone();
            serde_json::to_vec(&state).unwrap()
        })
    }
}

#[test]
fn quant_state_disagreeing_with_the_tensors_is_an_error() {
    let e = load_err(&edited_copy(
        "blocksize",
        edit_state("blocksize", 128.into()),
    ));
    assert!(
        e.contains(&format!("{Q}.absmax")) && e.contains("blocksize 128"),
        "{e}"
    );
    let e = load_err(&edited_copy(
        "shape",
        edit_state("shape", serde_json::json!([32, 128])),
    ));
    assert!(
        e.contains(Q) && e.contains("[32, 128]") && e.contains("[64, 64]"),
        "{e}"
    );
    let e = load_err(&edited_copy("fp4", edit_state("quant_type", "fp4".into())));
    assert!(e.contains(Q) && e.contains("fp4"), "{e}");
}

#[test]
fn truncated_packed_tensor_is_an_error() {
    let dir = edited_copy("truncated", |name, data| {
        (name == Q).then(|| data[..data.len() - 3].to_vec())
    });
    let e = load_err(&dir);
    assert!(
        e.contains(&format!("`{Q}`")) && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn unsupported_quantization_configs_are_errors_naming_the_key() {
    for (key, value, want) in [
        ("bnb_4bit_quant_type", serde_json::json!("fp4"), "only nf4"),
        (
            "bnb_4bit_use_double_quant",
            serde_json::json!(false),
            "double_quant",
        ),
        ("quant_method", serde_json::json!("gptq"), "gptq"),
    ] {
        let dir = edited_copy(key, |_, _| None);
        let p = dir.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        c["quantization_config"][key] = value;
        std::fs::write(&p, c.to_string()).unwrap();
        let e = load_err(&dir);
        assert!(
            e.contains("config.json") && e.contains(key) && e.contains(want),
            "{e}"
        );
    }
}

#[test]
fn nan_in_a_weight_being_quantized_names_the_tensor() {
    let src = fixture_dir("llama").join("model");
    let dense = CausalLm::load(&src, DType::F32).unwrap();
    let dir = tmp_dir("nan");
    let mut tensors = Vec::new();
    for (name, _) in dense.config.expected_tensors() {
        let t = dense.weight(&name).unwrap();
        let mut v = t.to_f32_vec().unwrap();
        if name == "model.layers.1.mlp.up_proj.weight" {
            v[77] = f32::NAN;
        }
        tensors.push((name, Tensor::from_f32(t.shape(), &v).unwrap()));
    }
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    write_safetensors(&dir.join("model.safetensors"), &refs, None).unwrap();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize: Some(64),
    };
    let e = CausalLm::load_with(&dir, &opts).err().unwrap().to_string();
    assert!(
        e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("flat index 77"),
        "{e}"
    );
}
