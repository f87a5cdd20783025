//! Frozen means free: the compiled LoRA training plan of a real model does no
//! gradient work for frozen weights; dropout touches only the adapter branch.

mod common;

use common::fixture_dir;
use graft::engine::compile_training;
use graft::ir::{backward, DType, Op};
use graft::models::{CausalLm, Lora, LoraConfig, RecordOptions, Targets};

fn model() -> CausalLm {
    CausalLm::load(&fixture_dir("llama").join("model"), DType::F32).unwrap()
}

#[test]
fn lora_plan_has_no_gradient_work_for_frozen_weights() {
    let model = model();
    let lora = Lora::load(&fixture_dir("llama").join("adapter"), &model.config).unwrap();
    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        dropout: false,
        ..Default::default()
    };
    let rec = model.record(16, opts).unwrap();

    let mut g = rec.graph.clone();
    let grads = backward(&mut g, rec.loss.unwrap()).unwrap();
    for (_, of) in &grads.contributions {
        if let Some(name) = g.leaf_name(*of) {
            assert!(
                g.is_trainable(*of),
                "a gradient contribution flows into frozen `{name}`"
            );
        }
    }
    assert_eq!(grads.params.len(), 2 * lora.modules.len());

    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
    let g = plan.graph();
    let mut weight_grads = 0;
    for &n in plan.schedule() {
        let node = g.node(n);
        match &node.op {
            // dW-shaped products (`dyᵀ·x`): only A and B may have them.
            Op::MatMul { ta: true, .. } => weight_grads += 1,
            Op::MatMulSum { terms, .. } => weight_grads += terms.iter().filter(|t| t.ta).count(),
            Op::EmbeddingGrad { .. } | Op::RmsNormGradWeight { .. } | Op::SumRows => {
                panic!(
                    "the LoRA plan computes a frozen gradient: {}",
                    node.op.name()
                )
            }
            _ => {}
        }
    }
    assert_eq!(
        weight_grads,
        2 * lora.modules.len(),
        "one dA and one dB per adapted module, nothing else"
    );
}

#[test]
fn training_the_base_does_schedule_its_gradients() {
    // The same count on full fine-tuning: proves the check above can fail.
    let model = model();
    let rec = model
        .record(
            16,
            RecordOptions {
                loss: true,
                ..Default::default()
            },
        )
        .unwrap();
    let mut g = rec.graph.clone();
    let params: Vec<_> = g.params().collect();
    for p in &params {
        g.set_trainable(*p, true).unwrap();
    }
    let plan = compile_training(g, rec.loss.unwrap(), &[]).unwrap();
    assert_eq!(plan.grads().len(), params.len());
    let ops: Vec<&str> = plan
        .schedule()
        .iter()
        .map(|&n| plan.graph().node(n).op.name())
        .collect();
    assert!(ops.contains(&"embedding_grad") && ops.contains(&"rms_norm_grad_weight"));
}

#[test]
fn dropout_touches_only_the_adapter_branch() {
    let model = model();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora: false,
    };
    let lora = Lora::init(cfg, &model.config, 7).unwrap();
    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        dropout: true,
        ..Default::default()
    };
    let rec = model.record(8, opts).unwrap();
    let g = &rec.graph;
    let mut dropouts = 0;
    for node in g
        .nodes()
        .iter()
        .filter(|n| matches!(n.op, Op::Dropout { .. }))
    {
        dropouts += 1;
        let out = node.outputs[0];
        let consumers: Vec<_> = g
            .nodes()
            .iter()
            .filter(|m| m.inputs.contains(&out))
            .collect();
        assert_eq!(consumers.len(), 1);
        let w = consumers[0].inputs[1];
        let name = g.leaf_name(w).unwrap_or("");
        assert!(name.ends_with("lora_A.weight"), "dropout feeds {name:?}");
    }
    assert_eq!(dropouts, lora.modules.len());
}

#[test]
fn lora_init_follows_peft() {
    let model = model();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora: false,
    };
    assert_eq!(cfg.scaling(), 2.0);
    assert_eq!(
        LoraConfig {
            use_rslora: true,
            ..cfg.clone()
        }
        .scaling(),
        16.0 / 8f32.sqrt()
    );
    let lora = Lora::init(cfg, &model.config, 1).unwrap();
    assert_eq!(lora.modules.len(), 7 * model.config.num_layers);
    for m in &lora.modules {
        let fan_in = m.a.shape()[1] as f32;
        let a = m.a.to_f32_vec().unwrap();
        let bound = 1.0 / fan_in.sqrt();
        assert!(a.iter().all(|x| x.abs() <= bound));
        // U(-b, b) has variance b²/3; with hundreds of samples it is well within 25%.
        let var = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!(
            (var / (bound * bound / 3.0) - 1.0).abs() < 0.25,
            "{}: variance {var}",
            m.path
        );
        assert!(m.b.to_f32_vec().unwrap().iter().all(|&x| x == 0.0));
    }
}

#[test]
fn f32_weights_are_memory_mapped_without_copies() {
    let model = model();
    assert!(model
        .weight("model.embed_tokens.weight")
        .unwrap()
        .is_mapped());
    let bf16 = CausalLm::load(&fixture_dir("qwen2").join("model"), DType::BF16).unwrap();
    assert!(bf16
        .weight("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .is_mapped());
    let converted = CausalLm::load(&fixture_dir("qwen2").join("model"), DType::F32).unwrap();
    assert!(!converted
        .weight("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .is_mapped());
}

#[test]
fn saved_adapter_loads_back_identically() {
    let model = model();
    let lora = Lora::load(&fixture_dir("llama").join("adapter"), &model.config).unwrap();
    let dir = std::env::temp_dir().join(format!("graft-adapter-roundtrip-{}", std::process::id()));
    lora.save(&dir, "tests/fixtures/llama/model").unwrap();
    let back = Lora::load(&dir, &model.config).unwrap();
    assert_eq!(back.config, lora.config);
    for (a, b) in lora.modules.iter().zip(&back.modules) {
        assert_eq!(a.path, b.path);
        assert_eq!(a.a.bytes(), b.a.bytes());
        assert_eq!(a.b.bytes(), b.b.bytes());
    }
}
