//! DoRA against PEFT (`use_dora=True`, fixtures from
//! tests/oracle/make_dora_fixtures.py): the magnitude's initial value, the
//! logits, the loss and the gradients of A, B and the magnitude, on an f32
//! base and on an NF4 base (QDoRA); and the merge.

mod common;

use common::{fixture_dir, rel_l2, Expected};
use graft::engine::{compile, compile_training, CpuExecutor};
use graft::ir::DType;
use graft::models::{Batch, CausalLm, LoadOptions, Lora, RecordOptions};

fn check(file: &str, quantize: Option<usize>) {
    let exp = Expected::open("dora", file);
    let opts = LoadOptions {
        dtype: DType::F32,
        quantize,
    };
    let model = CausalLm::load_with(&fixture_dir("llama").join("model"), &opts).unwrap();
    let lora = Lora::load(&fixture_dir("dora").join("adapter"), &model.config).unwrap();
    assert!(lora.config.use_dora);

    // PEFT's initial magnitude: the row norms of the (dequantized) weight.
    let mut fresh = lora.clone();
    for m in &mut fresh.modules {
        m.b = graft::engine::Tensor::zeros(m.b.shape(), DType::F32);
    }
    fresh.init_magnitudes(&model).unwrap();
    for m in &fresh.modules {
        let want = exp.f32(&format!("magnitude_init.{}", m.key_m()));
        let got = m.magnitude.as_ref().unwrap().to_f32_vec().unwrap();
        let e = rel_l2(&got, &want);
        assert!(
            e < 1e-6,
            "{file}: initial magnitude of {}: rel L2 {e:e}",
            m.path
        );
    }

    let ids = exp.i32("input_ids");
    let batch = Batch::new(&[&ids], None, 0).unwrap();
    let mut exec = CpuExecutor::new();
    let rec = model.record(ids.len(), RecordOptions::default()).unwrap();
    let plan = compile(rec.graph.clone(), &[rec.logits]).unwrap();
    let out = exec
        .run(&plan, &rec.feeds(&model, None, &batch).unwrap())
        .unwrap();
    let e = rel_l2(&out[0].to_f32_vec().unwrap(), &exp.f32("logits_base"));
    assert!(e < 1e-5, "{file}: base logits rel L2 {e:e}");

    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        ..Default::default()
    };
    let rec = model.record(ids.len(), opts).unwrap();
    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[rec.logits]).unwrap();
    let out = exec
        .run(&plan, &rec.feeds(&model, Some(&lora), &batch).unwrap())
        .unwrap();
    let e = rel_l2(&out[1].to_f32_vec().unwrap(), &exp.f32("logits"));
    eprintln!("{file}: DoRA logits rel L2 {e:e}");
    assert!(e < 1e-5, "{file}: DoRA logits rel L2 {e:e}");
    let e = rel_l2(&out[0].to_f32_vec().unwrap(), &exp.f32("loss"));
    assert!(e < 1e-5, "{file}: loss rel err {e:e}");
    let mut worst = 0f64;
    for (i, &(param, _)) in plan.grads().iter().enumerate() {
        let key = plan.graph().leaf_name(param).unwrap();
        let e = rel_l2(
            &out[2 + i].to_f32_vec().unwrap(),
            &exp.f32(&format!("grad.{key}")),
        );
        assert!(e < 1e-4, "{file}: grad of {key} rel L2 {e:e}");
        worst = worst.max(e);
    }
    assert_eq!(
        plan.grads().len(),
        3 * lora.modules.len(),
        "A, B and m of every module"
    );
    eprintln!("{file}: worst gradient rel L2 {worst:e}");

    let masked = exp.i32("labels_masked");
    let batch = Batch::new(&[&ids], Some(&[&masked]), 0).unwrap();
    let out = exec
        .run(&plan, &rec.feeds(&model, Some(&lora), &batch).unwrap())
        .unwrap();
    let e = rel_l2(&out[0].to_f32_vec().unwrap(), &exp.f32("loss_masked"));
    assert!(e < 1e-5, "{file}: masked loss rel err {e:e}");
}

#[test]
fn dora_matches_peft_on_an_f32_base() {
    check("expected.safetensors", None);
}

#[test]
fn qdora_matches_peft_on_an_nf4_base() {
    check("expected_nf4.safetensors", Some(64));
}

#[test]
fn a_merged_dora_adapter_matches_peft_merge_and_unload() {
    let exp = Expected::load("dora");
    let mut model = CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap();
    let lora = Lora::load(&fixture_dir("dora").join("adapter"), &model.config).unwrap();
    lora.merge_into(&mut model).unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ] {
        let got = model.weight(name).unwrap().to_f32_vec().unwrap();
        let e = rel_l2(&got, &exp.f32(&format!("merged.{name}")));
        assert!(e < 1e-6, "merged {name}: rel L2 {e:e}");
    }
}

#[test]
fn a_dora_adapter_saves_and_loads_in_peft_format() {
    let model = CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap();
    let lora = Lora::load(&fixture_dir("dora").join("adapter"), &model.config).unwrap();
    let out = std::env::temp_dir().join(format!("graft-dora-save-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    lora.save(&out, "tests/fixtures/llama/model").unwrap();
    let again = Lora::load(&out, &model.config).unwrap();
    for (a, b) in lora.modules.iter().zip(&again.modules) {
        for ((ka, ta), (kb, tb)) in a.tensors().iter().zip(b.tensors()) {
            assert_eq!(ka, &kb);
            assert_eq!(ta.bytes(), tb.bytes(), "{ka}");
        }
    }
    let cfg = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    assert!(cfg.contains("\"use_dora\": true"), "{cfg}");
}
