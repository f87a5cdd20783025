//! Activation recomputation on a real (tiny) Llama: the same loss and
//! gradients bit for bit as keeping the activations (QLoRA with dropout,
//! every layer recomputed), a lower planned peak, and LOMO's in-place
//! updates still ordered after the recomputed reads of the weights.

mod common;

use common::fixture_dir;
use graft::engine::{
    compile_fused_with, compile_training_with, CompileOptions, CpuExecutor, FusedRule, Plan, Tensor,
};
use graft::ir::DType;
use graft::models::{Batch, CausalLm, LoadOptions, Lora, LoraConfig, RecordOptions, Targets};

fn model(quantize: Option<usize>) -> CausalLm {
    let dir = fixture_dir("llama").join("model");
    CausalLm::load_with(
        &dir,
        &LoadOptions {
            dtype: DType::F32,
            quantize,
        },
    )
    .unwrap()
}

fn batch() -> Batch {
    let seqs: Vec<Vec<i32>> = (0..2)
        .map(|s| (0..24).map(|t| (s * 50 + t * 7) % 256).collect())
        .collect();
    let refs: Vec<&[i32]> = seqs.iter().map(Vec::as_slice).collect();
    Batch::new(&refs, None, 3).unwrap()
}

fn bits(ts: &[Tensor]) -> Vec<Vec<u32>> {
    ts.iter()
        .map(|t| {
            t.to_f32_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect()
}

#[test]
fn recomputed_qlora_step_is_bit_identical_with_a_lower_peak() {
    let m = model(Some(64));
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.1,
        targets: Targets::AllLinear,
        use_rslora: false,
        use_dora: false,
    };
    let mut lora = Lora::init(cfg, &m.config, 7).unwrap();
    // B away from zero, so every adapter term (and its gradient) matters.
    for (i, md) in lora.modules.iter_mut().enumerate() {
        let b = md.b.as_f32_mut().unwrap();
        b.iter_mut()
            .enumerate()
            .for_each(|(j, x)| *x = ((i + j) % 7) as f32 * 0.01 - 0.03);
    }
    let b = batch();
    let opts = RecordOptions {
        lora: Some(&lora),
        train_lora: true,
        loss: true,
        dropout: true,
        ..Default::default()
    };
    let rec = m.record(b.tokens(), opts).unwrap();
    assert_eq!(rec.layer_inputs.len(), m.config.num_layers + 1);
    let compile = |checkpoints: Vec<_>| -> Plan {
        let o = CompileOptions {
            fuse: true,
            checkpoints,
        };
        compile_training_with(rec.graph.clone(), rec.loss.unwrap(), &[], &o).unwrap()
    };
    let (kept, recomputed) = (compile(Vec::new()), compile(rec.layer_inputs.clone()));
    assert_eq!(recomputed.recompute().blocks, m.config.num_layers);
    assert!(
        recomputed.peak_bytes() < kept.peak_bytes(),
        "peak {} with recomputation vs {} without",
        recomputed.peak_bytes(),
        kept.peak_bytes()
    );
    let run = |p: &Plan| {
        CpuExecutor::new()
            .run(p, &rec.feeds(&m, Some(&lora), &b).unwrap())
            .unwrap()
    };
    let (a, c) = (run(&kept), run(&recomputed));
    assert!(a[0].as_f32().unwrap()[0].is_finite());
    assert_eq!(a.len(), c.len());
    assert_eq!(bits(&a), bits(&c), "loss and every gradient");
}

#[test]
fn lomo_with_recomputation_updates_the_same_weights() {
    const SGD: FusedRule = FusedRule::Sgd {
        weight_decay: 0.0,
        clip_value: 0.0,
    };
    let b = batch();
    let step = |recompute: bool| -> (Vec<f32>, CausalLm) {
        let mut m = model(None);
        let opts = RecordOptions {
            train_base: true,
            loss: true,
            ..Default::default()
        };
        let rec = m.record(b.tokens(), opts).unwrap();
        let checkpoints = match recompute {
            true => rec.layer_inputs.clone(),
            false => Vec::new(),
        };
        let o = CompileOptions {
            fuse: true,
            checkpoints,
        };
        let (plan, inputs) =
            compile_fused_with(rec.graph.clone(), rec.loss.unwrap(), SGD, &o).unwrap();
        assert_eq!(plan.recompute().blocks > 0, recompute);
        let (lr, one) = (
            Tensor::from_f32(&[1], &[0.05]).unwrap(),
            Tensor::from_f32(&[1], &[1.0]).unwrap(),
        );
        let mut losses = Vec::new();
        let mut exec = CpuExecutor::new();
        // Two steps: the second sees the first's in-place updates.
        for _ in 0..2 {
            let mut feeds = rec.feeds_mut(&mut m, &b).unwrap();
            feeds.bind(inputs.lr, &lr).bind(inputs.coef, &one);
            losses.push(exec.run(&plan, &feeds).unwrap()[0].as_f32().unwrap()[0]);
        }
        (losses, m)
    };
    let ((la, ma), (lb, mb)) = (step(false), step(true));
    assert_eq!(la, lb);
    assert!(la[1] < la[0], "the update moves the loss: {la:?}");
    for (name, t) in ma.weights() {
        let u = mb.weight(name).unwrap();
        assert_eq!(t.bytes(), u.bytes(), "{name}");
    }
}
