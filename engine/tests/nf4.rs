//! The NF4 linear in a graph: same values and input gradients as a dense
//! linear on the dequantized weight, and no gradient for the NF4 weight.

use graft_engine::ir::{DType, Graph, Nf4Layout};
use graft_engine::kernels::nf4::{dynamic_map_signed, Nf4Parts};
use graft_engine::rng::Rng;
use graft_engine::{compile_training, CpuExecutor, Feeds, Tensor};

fn random_nf4(rows: usize, cols: usize, block: usize, seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let l = Nf4Layout::new(rows * cols, block);
    let parts = Nf4Parts {
        block,
        packed: (0..l.packed.len())
            .map(|_| (r.next_u64() & 255) as u8)
            .collect(),
        absmax: (0..l.blocks).map(|_| (r.next_u64() & 255) as u8).collect(),
        nested_scales: (0..l.nested_blocks).map(|_| r.uniform(0.01, 0.1)).collect(),
        offset: 0.1,
        nested_map: dynamic_map_signed().to_vec(),
    };
    Tensor::from_nf4(&[rows, cols], &parts).unwrap()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert!(a.iter().chain(b).all(|v| v.is_finite()));
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// loss = CE(x·Wᵀ + b, labels) with x trainable; returns (loss, logits, dx).
fn run(w: &Tensor, x: &Tensor, labels: &Tensor) -> (f32, Vec<f32>, Vec<f32>) {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let mut g = Graph::new();
    let xv = g.param("x", &[m, k], DType::F32, true);
    let wv = g.param("w", w.shape(), w.dtype(), true);
    let lv = g.input("labels", &[m], DType::I32);
    let y = g.linear(xv, wv, None).unwrap();
    let loss = g.cross_entropy(y, lv).unwrap();
    let plan = compile_training(g, loss, &[y]).unwrap();
    // The NF4 weight is frozen whatever was asked: only x has a gradient.
    assert_eq!(plan.grads().len(), if w.dtype().is_nf4() { 1 } else { 2 });
    let mut feeds = Feeds::new();
    feeds.bind(xv, x).bind(wv, w).bind(lv, labels);
    let out = CpuExecutor::new().run(&plan, &feeds).unwrap();
    let dx = out[2].to_f32_vec().unwrap();
    (
        out[0].as_f32().unwrap()[0],
        out[1].to_f32_vec().unwrap(),
        dx,
    )
}

#[test]
fn nf4_linear_equals_dense_linear_on_the_dequantized_weight() {
    let (m, n, k) = (5, 37, 150); // K is not a multiple of the block size
    let w = random_nf4(n, k, 64, 3);
    let dense = Tensor::from_f32(&[n, k], &w.to_f32_vec().unwrap()).unwrap();
    let mut r = Rng::new(9);
    let xs: Vec<f32> = (0..m * k).map(|_| r.uniform(-1.0, 1.0)).collect();
    let x = Tensor::from_f32(&[m, k], &xs).unwrap();
    let labels = Tensor::from_i32(&[m], &[0, 5, -100, 36, 2]).unwrap();
    let (l4, y4, dx4) = run(&w, &x, &labels);
    let (ld, yd, dxd) = run(&dense, &x, &labels);
    assert!(rel_l2(&y4, &yd) < 1e-5, "logits {}", rel_l2(&y4, &yd));
    assert!(((l4 - ld) / ld).abs() < 1e-5, "loss {l4} vs {ld}");
    assert!(rel_l2(&dx4, &dxd) < 1e-5, "dx {}", rel_l2(&dx4, &dxd));
}

#[test]
fn nf4_weights_cannot_be_made_trainable() {
    let mut g = Graph::new();
    let w = g.param("w", &[4, 64], DType::Nf4 { block: 64 }, true);
    assert!(!g.is_trainable(w));
    let e = g.set_trainable(w, true).unwrap_err().to_string();
    assert!(e.contains("`w`") && e.contains("frozen"), "{e}");
}

#[test]
fn nf4_parts_of_the_wrong_length_are_refused() {
    let l = Nf4Layout::new(10 * 64, 64);
    let parts = Nf4Parts {
        block: 64,
        packed: vec![0; l.packed.len() - 1],
        absmax: vec![0; l.blocks],
        nested_scales: vec![1.0; l.nested_blocks],
        offset: 0.0,
        nested_map: dynamic_map_signed().to_vec(),
    };
    let e = Tensor::from_nf4(&[10, 64], &parts).unwrap_err().to_string();
    assert!(
        e.contains("packed data has 319 entries") && e.contains("needs 320"),
        "{e}"
    );
}
