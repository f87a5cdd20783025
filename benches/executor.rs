//! The CPU executor on real plans: a LoRA training step of the llama fixture
//! (forward + backward through every op) and a plain matmul plan.
//!
//! Run: `cargo bench --bench executor`.

use criterion::{criterion_group, criterion_main, Criterion};
use graft::engine::{compile, compile_training, CpuExecutor, Feeds, Tensor};
use graft::ir::{DType, Graph};
use graft::models::{Batch, CausalLm, Lora, RecordOptions};
use std::path::PathBuf;

fn lora_step(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let model = CausalLm::load(&dir.join("model"), DType::F32).unwrap();
    let lora = Lora::load(&dir.join("adapter"), &model.config).unwrap();
    let seqs: Vec<Vec<i32>> = (0..4)
        .map(|s| (0..64).map(|t| (s * 7 + t * 13) % 256).collect())
        .collect();
    let refs: Vec<&[i32]> = seqs.iter().map(Vec::as_slice).collect();
    let batch = Batch::new(&refs, None, 0).unwrap();
    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        dropout: false,
        ..Default::default()
    };
    let rec = model.record(batch.tokens(), opts).unwrap();
    let plan = compile_training(rec.graph.clone(), rec.loss.unwrap(), &[]).unwrap();
    let feeds = rec.feeds(&model, Some(&lora), &batch).unwrap();
    let mut exec = CpuExecutor::new();
    c.bench_function("llama fixture LoRA train step, 4x64 tokens", |b| {
        b.iter(|| exec.run(&plan, &feeds).unwrap())
    });
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
    targets = lora_step, matmul
}
criterion_main!(benches);
