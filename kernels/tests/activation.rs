//! Gated activations (SwiGLU, GeGLU-tanh) against f64 formulas, and their
//! gradients against central differences.

mod common;

use common::*;
use graft_kernels::activation::{gated_act, gated_act_grad, Act};
use graft_kernels::{bf16, Elem};
use proptest::prelude::*;

fn act_ref(kind: Act, g: f64) -> f64 {
    match kind {
        Act::Silu => g / (1.0 + (-g).exp()),
        Act::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
            0.5 * g * (1.0 + u.tanh())
        }
    }
}

fn gated_ref(kind: Act, gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| act_ref(kind, g) * u)
        .collect()
}

/// The size of the terms the f32 kernel combines, where they cancel.
///
/// GELU-tanh is `0.5·g·(1 + tanh(u))`, its derivative `0.5·(1 + tanh(u)) +
/// 0.5·g·(1 − tanh²(u))·u'`; as in PyTorch, the kernel forms `1 + tanh(u)` and
/// `1 − tanh²(u)` in f32, which for negative gates cancel to far below the
/// terms (down to ~3e-5 at g = −4). Their f32 rounding is then absolute at the
/// scale of the terms, `|0.5·g·up|` (`|0.5·g·dy|` for `dup`) and
/// `|dy·up|·(0.5 + 0.5·|g|·u')` for `dgate`, so the
/// error is measured against those norms where the result itself is smaller.
/// SiLU has no such cancellation: no floor.
fn act_floor(kind: Act, gate: &[f64], factor: &[f64]) -> f64 {
    match kind {
        Act::Silu => 0.0,
        Act::GeluTanh => norm(
            &gate
                .iter()
                .zip(factor)
                .map(|(g, f)| 0.5 * g * f)
                .collect::<Vec<_>>(),
        ),
    }
}

fn dgate_floor(kind: Act, gate: &[f64], up: &[f64], dy: &[f64]) -> f64 {
    match kind {
        Act::Silu => 0.0,
        Act::GeluTanh => {
            let terms: Vec<f64> = (0..gate.len())
                .map(|i| {
                    let g = gate[i];
                    let du = (2.0 / std::f64::consts::PI).sqrt() * (1.0 + 3.0 * 0.044715 * g * g);
                    dy[i] * up[i] * (0.5 + 0.5 * g.abs() * du)
                })
                .collect();
            norm(&terms)
        }
    }
}

fn kind() -> impl Strategy<Value = Act> {
    prop_oneof![Just(Act::Silu), Just(Act::GeluTanh)]
}

/// Gates in [-4, 4], ups in [-2, 2].
fn inputs(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = Gen::new(seed);
    (rng.vec(n, -4.0, 4.0), rng.vec(n, -2.0, 2.0))
}

fn forward<T: Elem>(kind: Act, gate: &[T], up: &[T]) -> Vec<T> {
    let mut y = nan_buf(gate.len());
    gated_act(kind, gate, up, &mut y);
    y
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn forward_f32(kind in kind(), n in dim(5000), seed: u64) {
        let (gate, up) = inputs(n, seed);
        let (g64, u64_) = (to_f64(&gate), to_f64(&up));
        let want = gated_ref(kind, &g64, &u64_);
        check_floor("y", &forward(kind, &gate, &up), &want, act_floor(kind, &g64, &u64_), FWD_TOL)?;
    }

    #[test]
    fn forward_bf16(kind in kind(), n in dim(5000), seed: u64) {
        let (gate, up) = inputs(n, seed);
        let (gate, up): (Vec<bf16>, Vec<bf16>) = (to_elem(&gate), to_elem(&up));
        let want = gated_ref(kind, &to_f64(&gate), &to_f64(&up));
        check("y", &forward(kind, &gate, &up), &want, BF16_TOL)?;
    }

    #[test]
    fn grad(kind in kind(), n in dim(1000), seed: u64) {
        let (gate, up) = inputs(n, seed);
        let dy = Gen::new(!seed).vec(n, -1.0, 1.0);
        let (g64, u64_, dy64) = (to_f64(&gate), to_f64(&up), to_f64(&dy));
        let want_dgate = numeric_grad(&g64, |g| dot(&dy64, &gated_ref(kind, g, &u64_)));
        let want_dup = numeric_grad(&u64_, |u| dot(&dy64, &gated_ref(kind, &g64, u)));
        let mut dgate = nan_buf::<f32>(n);
        let mut dup = nan_buf::<f32>(n);
        gated_act_grad(kind, &gate, &up, &dy, &mut dgate, &mut dup);
        check_floor("dgate", &dgate, &want_dgate, dgate_floor(kind, &g64, &u64_, &dy64), GRAD_TOL)?;
        check_floor("dup", &dup, &want_dup, act_floor(kind, &g64, &dy64), GRAD_TOL)?;
    }
}
