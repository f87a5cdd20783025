//! The CPU executor on real plans: LoRA and DoRA training steps (forward +
//! backward through every op) on the llama fixture and on the embedded
//! default model (NF4, bf16), and a plain matmul plan.
//!
//! Run: `cargo bench --bench executor`.

use criterion::{criterion_group, criterion_main, Criterion};
use graft::engine::{compile, compile_training, CpuExecutor, Feeds, Tensor};
use graft::ir::{DType, Graph};
use graft::models::{Batch, CausalLm, LoadOptions, Lora, LoraConfig, RecordOptions, Targets};
use std::path::PathBuf;

/// A training step with a LoRA or a DoRA adapter (r=16 on every linear, B
/// non-zero) on the same model and batch: DoRA's cost over LoRA's.
fn adapter_steps(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let models = [
        (
            "llama fixture f32",
            root.join("tests/fixtures/llama/model"),
            DType::F32,
            None,
        ),
        (
            "default model NF4 bf16",
            root.join("trainer/assets/default/model"),
            DType::BF16,
            Some(64),
        ),
    ];
    for (name, dir, dtype, quantize) in models {
        let model = CausalLm::load_with(&dir, &LoadOptions { dtype, quantize }).unwrap();
        let vocab = model.config.vocab_size as i32;
        let seqs: Vec<Vec<i32>> = (0..4)
            .map(|s| (0..64).map(|t| (s * 7 + t * 13) % vocab).collect())
            .collect();
        let refs: Vec<&[i32]> = seqs.iter().map(Vec::as_slice).collect();
        let batch = Batch::new(&refs, None, 0).unwrap();
        for use_dora in [false, true] {
            let cfg = LoraConfig {
                r: 16,
                alpha: 32.0,
                dropout: 0.0,
                targets: Targets::AllLinear,
                use_rslora: false,
                use_dora,
            };
            let mut lora = Lora::init(cfg, &model.config, 1).unwrap();
            for m in &mut lora.modules {
                m.b.as_f32_mut()
                    .unwrap()
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = 0.01 * ((i % 7) as f32 - 3.0));
            }
            if use_dora {
                lora.init_magnitudes(&model).unwrap();
            }
            let opts = RecordOptions {
                lora: Some(&lora),
                train_lora: true,
                loss: true,
                ..Default::default()
            };
            let rec = model.record(batch.tokens(), opts).unwrap();
            let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
            let feeds = rec.feeds(&model, Some(&lora), &batch).unwrap();
            let mut exec = CpuExecutor::new();
            let kind = if use_dora { "DoRA" } else { "LoRA" };
            c.bench_function(&format!("{name}: {kind} train step, 4x64 tokens"), |b| {
                b.iter(|| exec.run(&plan, &feeds).unwrap())
            });
        }
    }
}

fn matmul(c: &mut Criterion) {
    let (m, k, n) = (256, 1024, 1024);
    let mut g = Graph::new();
    let x = g.input("x", &[m, k], DType::F32);
    let w = g.param("w", &[n, k], DType::F32, false);
    let y = g.linear(x, w, None).unwrap();
    let plan = compile(g, &[y]).unwrap();
    let xt = Tensor::from_f32(&[m, k], &vec![0.5; m * k]).unwrap();
    let wt = Tensor::from_f32(&[n, k], &vec![0.25; n * k]).unwrap();
    let mut feeds = Feeds::new();
    feeds.bind(x, &xt).bind(w, &wt);
    let mut exec = CpuExecutor::new();
    c.bench_function("reference f32 linear 256x1024x1024", |b| {
        b.iter(|| exec.run(&plan, &feeds).unwrap())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = adapter_steps, matmul
}
criterion_main!(benches);
