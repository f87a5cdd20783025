//! Generation with the key/value cache against recomputing the whole
//! sequence for every token, and sampling's reproducibility.

mod common;

use common::fixtures;
use graft_engine::ir::DType;
use graft_engine::{compile, CpuExecutor, Device, Executor};
use graft_models::{Batch, CausalLm, Lora, RecordOptions};
use graft_trainer::generate::{Generator, Sampling};

/// Greedy continuation computing the full forward pass at every step.
fn greedy_without_cache(
    model: &CausalLm,
    lora: Option<&Lora>,
    prompt: &[i32],
    n: usize,
) -> Vec<i32> {
    let mut seq = prompt.to_vec();
    let vocab = model.config.vocab_size;
    for _ in 0..n {
        let rec = model
            .record(
                seq.len(),
                RecordOptions {
                    lora,
                    ..Default::default()
                },
            )
            .unwrap();
        let batch = Batch::new(&[&seq], None, 0).unwrap();
        let plan = compile(rec.graph.clone(), &[rec.logits]).unwrap();
        let out = CpuExecutor::new()
            .run(&plan, &rec.feeds(model, lora, &batch).unwrap())
            .unwrap();
        let logits = &out[0].as_f32().unwrap()[(seq.len() - 1) * vocab..];
        let next = (0..vocab).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
        seq.push(next as i32);
    }
    seq[prompt.len()..].to_vec()
}

#[test]
fn cached_generation_equals_recomputing_every_step() {
    let dir = fixtures().join("llama");
    for dtype in [DType::F32, DType::BF16] {
        let model = CausalLm::load(&dir.join("model"), dtype).unwrap();
        let lora = Lora::load(&dir.join("adapter"), &model.config).unwrap();
        let prompt = [1, 42, 7, 199, 23];
        // 70 tokens: the cache grows past its first 64 rows on the way.
        let want = greedy_without_cache(&model, Some(&lora), &prompt, 70);
        let mut exec = Executor::new(Device::Cpu).unwrap();
        let mut g = Generator::new(&model, Some(&lora), &mut exec);
        let got = g.generate(&prompt, 70, &[], &Sampling::GREEDY).unwrap();
        assert_eq!(got, want, "{dtype}");
        // The generator is reusable: a second prompt starts from a clean cache.
        let got2 = g.generate(&prompt[..3], 5, &[], &Sampling::GREEDY).unwrap();
        assert_eq!(
            got2,
            greedy_without_cache(&model, Some(&lora), &prompt[..3], 5)
        );
        // A stop token ends generation before it.
        let stop = g
            .generate(&prompt, 70, &[want[3]], &Sampling::GREEDY)
            .unwrap();
        let cut = want.iter().position(|&t| t == want[3]).unwrap();
        assert_eq!(stop, want[..cut]);
    }
}

#[test]
fn sampling_is_reproducible_and_top_p_near_zero_is_greedy() {
    let dir = fixtures().join("llama");
    let model = CausalLm::load(&dir.join("model"), DType::F32).unwrap();
    let mut exec = Executor::new(Device::Cpu).unwrap();
    let mut g = Generator::new(&model, None, &mut exec);
    let prompt = [3, 14, 15, 92];
    let s = |seed| Sampling {
        temperature: 1.0,
        top_p: 0.9,
        seed,
    };
    let a = g.generate(&prompt, 20, &[], &s(1)).unwrap();
    assert_eq!(a, g.generate(&prompt, 20, &[], &s(1)).unwrap());
    assert_ne!(a, g.generate(&prompt, 20, &[], &s(2)).unwrap());
    let nucleus = Sampling {
        temperature: 1.0,
        top_p: 1e-6,
        seed: 5,
    };
    assert_eq!(
        g.generate(&prompt, 20, &[], &nucleus).unwrap(),
        g.generate(&prompt, 20, &[], &Sampling::GREEDY).unwrap()
    );
    // Room for usize::MAX new tokens is not taken up front: the cache grows
    // as tokens come (here none: every token stops).
    let every: Vec<i32> = (0..model.config.vocab_size as i32).collect();
    let none = g.generate(&prompt, usize::MAX, &every, &Sampling::GREEDY);
    assert_eq!(none.unwrap(), Vec::<i32>::new());
}
