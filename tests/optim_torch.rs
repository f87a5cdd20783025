//! The optimizers reproduce torch.optim bit for bit: six steps of AdamW
//! (constant and warm-up learning rates) and SGD (plain, and with momentum
//! and weight decay) on fixtures from tests/oracle/make_optim_fixtures.py.

mod common;

use common::fixture_dir;
use graft::engine::optim::{AdamW, AdamWConfig, Sgd};
use safetensors::SafeTensors;

const STEPS: usize = 6;
const PARAMS: usize = 3;

struct Fixture(Vec<u8>);

impl Fixture {
    fn load(name: &str) -> Fixture {
        Fixture(std::fs::read(fixture_dir("optim").join(name)).unwrap())
    }
    fn get(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        t.data()
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Runs `step(params, grads, s)` six times and compares every parameter after
/// every step with the fixture's, to the bit.
fn replay(
    f: &Fixture,
    prefix: &str,
    mut step: impl FnMut(&mut [&mut [f32]], &[&[f32]], usize),
) -> Vec<Vec<f32>> {
    let mut params: Vec<Vec<f32>> = (0..PARAMS)
        .map(|i| f.get(&format!("{prefix}p{i}.init")))
        .collect();
    for s in 0..STEPS {
        let grads: Vec<Vec<f32>> = (0..PARAMS)
            .map(|i| f.get(&format!("{prefix}p{i}.grad{s}")))
            .collect();
        let grad_refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
        let mut refs: Vec<&mut [f32]> = params.iter_mut().map(Vec::as_mut_slice).collect();
        step(&mut refs, &grad_refs, s);
        for (i, p) in params.iter().enumerate() {
            let want = f.get(&format!("{prefix}p{i}.step{s}"));
            assert_eq!(bits(p), bits(&want), "{prefix}p{i} after step {s}");
        }
    }
    params
}

#[test]
fn adamw_matches_torch_bit_for_bit() {
    let f = Fixture::load("adamw.safetensors");
    let sizes: Vec<usize> = (0..PARAMS)
        .map(|i| f.get(&format!("p{i}.init")).len())
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default(), &sizes);
    replay(&f, "", |p, g, _| opt.step(p, g, 1e-2).unwrap());
    assert_eq!(bits(&opt.moments[0].0), bits(&f.get("p0.exp_avg")));
    assert_eq!(bits(&opt.moments[0].1), bits(&f.get("p0.exp_avg_sq")));

    // Linear warm-up, no weight decay: the learning rate changes every step.
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::new(cfg, &sizes);
    replay(&f, "warm.", |p, g, s| {
        opt.step(p, g, 1e-2 * (s + 1) as f64 / STEPS as f64)
            .unwrap()
    });
}

#[test]
fn sgd_matches_torch_bit_for_bit() {
    let f = Fixture::load("sgd.safetensors");
    let sizes: Vec<usize> = (0..PARAMS)
        .map(|i| f.get(&format!("p{i}.init")).len())
        .collect();
    let mut opt = Sgd::new(0.0, 0.0, &sizes);
    replay(&f, "", |p, g, _| opt.step(p, g, 0.1).unwrap());
    let mut opt = Sgd::new(0.9, 0.01, &sizes);
    replay(&f, "mom.", |p, g, _| opt.step(p, g, 0.1).unwrap());
    assert_eq!(
        bits(&opt.buffers.as_ref().unwrap()[0]),
        bits(&f.get("mom.p0.momentum_buffer"))
    );
}

#[test]
fn mismatched_lengths_are_errors() {
    let mut opt = AdamW::new(AdamWConfig::default(), &[4]);
    let mut p = [0f32; 3];
    let e = opt
        .step(&mut [&mut p], &[&[0.0; 3]], 1e-3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("parameter 0 has 3 values"), "{e}");
}
