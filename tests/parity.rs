//! Proof against the real thing: each fixture model (made by
//! tests/oracle/make_fixtures.py with transformers + PEFT) loaded by Graft
//! gives the oracle's logits, loss and LoRA gradients in f32.

mod common;

use common::{fixture_dir, rel_l2, Expected, FIXTURES};
use graft::engine::{compile, compile_training, CpuExecutor};
use graft::ir::DType;
use graft::models::{Batch, CausalLm, Lora, RecordOptions};

fn check(name: &str) {
    let dir = fixture_dir(name);
    let exp = Expected::load(name);
    let model = CausalLm::load(&dir.join("model"), DType::F32).unwrap();
    let lora = Lora::load(&dir.join("adapter"), &model.config).unwrap();
    let ids = exp.i32("input_ids");
    let batch = Batch::new(&[&ids], None, 0).unwrap();
    let mut exec = CpuExecutor::new();

    // Base model, no adapter.
    let rec = model.record(ids.len(), RecordOptions::default()).unwrap();
    let feeds = rec.feeds(&model, None, &batch).unwrap();
    let plan = compile(rec.graph.clone(), &[rec.logits]).unwrap();
    let out = exec.run(&plan, &feeds).unwrap();
    let e = rel_l2(&out[0].to_f32_vec().unwrap(), &exp.f32("logits_base"));
    assert!(e < 1e-5, "{name}: base logits rel L2 {e:e}");

    // With the adapter: logits, loss and the gradient of every A and B.
    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        dropout: false,
        ..Default::default()
    };
    let rec = model.record(ids.len(), opts).unwrap();
    let feeds = rec.feeds(&model, Some(&lora), &batch).unwrap();
    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[rec.logits]).unwrap();
    let out = exec.run(&plan, &feeds).unwrap();
    let e = rel_l2(&out[1].to_f32_vec().unwrap(), &exp.f32("logits"));
    assert!(e < 1e-5, "{name}: adapter logits rel L2 {e:e}");
    eprintln!("{name}: logits rel L2 {e:e}");
    let e = rel_l2(&out[0].to_f32_vec().unwrap(), &exp.f32("loss"));
    assert!(e < 1e-5, "{name}: loss rel err {e:e}");

    let mut checked = 0;
    let mut worst = 0f64;
    for (i, &(param, _)) in plan.grads().iter().enumerate() {
        let key = plan.graph().leaf_name(param).unwrap();
        let got = out[2 + i].to_f32_vec().unwrap();
        let want = exp.f32(&format!("grad.{key}"));
        let e = rel_l2(&got, &want);
        assert!(e < 1e-4, "{name}: grad of {key} rel L2 {e:e}");
        worst = worst.max(e);
        checked += 1;
    }
    let want = exp
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count();
    assert_eq!(checked, want, "{name}: every LoRA tensor has a gradient");
    assert_eq!(checked, 2 * lora.modules.len());
    eprintln!("{name}: worst LoRA gradient rel L2 {worst:e}");

    // Loss with prompt tokens masked (-100 labels).
    let masked = exp.i32("labels_masked");
    let batch = Batch::new(&[&ids], Some(&[&masked]), 0).unwrap();
    let feeds = rec.feeds(&model, Some(&lora), &batch).unwrap();
    let out = exec.run(&plan, &feeds).unwrap();
    let e = rel_l2(&out[0].to_f32_vec().unwrap(), &exp.f32("loss_masked"));
    assert!(e < 1e-5, "{name}: masked loss rel err {e:e}");
}

#[test]
fn llama_matches_transformers() {
    check(FIXTURES[0]);
}

#[test]
fn mistral_sharded_f16_sliding_window_matches_transformers() {
    check(FIXTURES[1]);
}

#[test]
fn qwen2_bf16_bias_rslora_matches_transformers() {
    check(FIXTURES[2]);
}

#[test]
fn gemma_tied_geglu_matches_transformers() {
    check(FIXTURES[3]);
}
