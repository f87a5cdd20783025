//! LoRA training end to end on a real (tiny) model: plan, executor and
//! AdamW together drive the loss down on a batch, deterministically.

mod common;

use common::fixture_dir;
use graft::engine::optim::{AdamW, AdamWConfig};
use graft::engine::{compile_training, CpuExecutor};
use graft::ir::DType;
use graft::models::{Batch, CausalLm, LoadOptions, Lora, LoraConfig, RecordOptions, Targets};

/// Losses of `steps` AdamW steps on one fixed batch of two sequences.
fn train(quantize: Option<usize>, steps: usize) -> Vec<f32> {
    let dir = fixture_dir("llama").join("model");
    let model = CausalLm::load_with(
        &dir,
        &LoadOptions {
            dtype: DType::F32,
            quantize,
        },
    )
    .unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora: false,
    };
    let mut lora = Lora::init(cfg, &model.config, 42).unwrap();
    let seqs: Vec<Vec<i32>> = (0..2)
        .map(|s| (0..24).map(|t| (s * 50 + t * 7) % 256).collect())
        .collect();
    let refs: Vec<&[i32]> = seqs.iter().map(Vec::as_slice).collect();
    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        dropout: true,
        ..Default::default()
    };
    let rec = model.record(48, opts).unwrap();
    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
    // Gradient outputs follow the loss, in the order of the plan's grads.
    let names: Vec<String> = plan
        .grads()
        .iter()
        .map(|(p, _)| plan.graph().leaf_name(*p).unwrap().to_string())
        .collect();
    let sizes: Vec<usize> = lora
        .modules
        .iter()
        .flat_map(|m| [m.a.numel(), m.b.numel()])
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &sizes);
    let mut exec = CpuExecutor::new();
    let mut losses = Vec::new();
    for step in 0..steps {
        let batch = Batch::new(&refs, None, step as u32).unwrap();
        let out = exec
            .run(&plan, &rec.feeds(&model, Some(&lora), &batch).unwrap())
            .unwrap();
        losses.push(out[0].as_f32().unwrap()[0]);
        let grads: Vec<Vec<f32>> = lora
            .modules
            .iter()
            .flat_map(|m| [m.key_a(), m.key_b()])
            .map(|k| {
                let i = names
                    .iter()
                    .position(|n| *n == k)
                    .expect("every adapter tensor has a gradient");
                out[1 + i].to_f32_vec().unwrap()
            })
            .collect();
        let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let mut params: Vec<&mut [f32]> = lora
            .modules
            .iter_mut()
            .flat_map(|m| [&mut m.a, &mut m.b])
            .map(|t| t.as_f32_mut().unwrap())
            .collect();
        opt.step(&mut params, &grad_refs, 1e-2).unwrap();
    }
    losses
}

#[test]
fn lora_training_drives_the_loss_down_deterministically() {
    let losses = train(None, 25);
    let (first, last) = (losses[0], *losses.last().unwrap());
    eprintln!("LoRA loss {first} -> {last}");
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.5 * first, "loss {first} -> {last}: {losses:?}");
    let again = train(None, 25);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&losses), bits(&again), "two runs, same bits");
}

#[test]
fn qlora_training_on_an_nf4_base_drives_the_loss_down() {
    let losses = train(Some(64), 25);
    let (first, last) = (losses[0], *losses.last().unwrap());
    eprintln!("QLoRA loss {first} -> {last}");
    assert!(last < 0.5 * first, "loss {first} -> {last}: {losses:?}");
}
